"""Shared helpers: errors, stage set-up, seeding, devices, frame preprocessing, checkpoints and model
loading, episode files, frame streaming, the latent cache.

Everything here is used by several stages; no stage keeps a private variant of any of it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import random
import signal
import sys
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence, get_args

import cv2
import numpy as np
import torch
from tqdm import tqdm

from actor_critic import ControllerConfig, build_controller
from conv_vae import ConvVAE, ConvVAEConfig
from world_model import WorldModelConfig, build_world_model

FRAME_SIZE = 64  # the VAE's input is FRAME_SIZE x FRAME_SIZE RGB
EPISODE_KEYS = ("obs", "action", "reward", "terminated", "truncated", "seed")
# Optional keys and the value a file without them means: episodes collected before the decision clock
# was recorded held each action for 1 frame.
OPTIONAL_EPISODE_KEYS = {"action_repeat": 1}


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, bad file): printed as one line, no traceback."""


def run_main(main: Callable[[Any], Any], args_type: type, description: str | None = None) -> None:
    """Parse `args_type` with tyro, run `main(args)`, and turn a UserError into one line and exit 2."""
    import tyro

    args = tyro.cli(args_type, description=description)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` stops a stage as cleanly as Ctrl-C
    try:
        main(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:  # a path the user gave that cannot be read or written
        print(f"error: {error.strerror or error}: {error.filename or ''}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# ----------------------------------------------------------------------------- stages


@dataclasses.dataclass
class StageArgs:
    """Flags every training stage shares (each stage's Args adds its own after these)."""

    data_dir: Path = Path("data")
    """episodes are read from DATA_DIR/rollouts/*/"""
    ckpt_dir: Path = Path("checkpoints")
    """checkpoints are read and written here"""
    log_dir: Path = Path("runs")
    """TensorBoard logs go to LOG_DIR/<stage>-<time>/"""
    seed: int = 0
    device: str = "auto"
    """auto, cpu or cuda"""
    threads: int = 0
    """torch CPU threads (0: torch's default, one per core)"""
    fresh: bool = False
    """ignore the stage's *_latest.pt checkpoint and start over"""
    collect: bool = True
    """collect random episodes first when DATA_DIR has none"""
    collect_episodes: int = 200
    """episodes to collect when DATA_DIR is empty"""
    collect_max_steps: int = 1000
    workers: int = 2
    """collection worker processes"""
    env_backend: str = "fast"
    """fast (pixel-exact CarRacing-v3, ~2.5x stock), gymnasium (stock) or envpool (approximate clone)"""


def setup_stage(args) -> torch.device:
    """Seed everything, set the torch threads and return the device (args: any stage's, with seed,
    threads and device)."""
    seed_everything(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def resume_checkpoint(latest_path: Path, args: StageArgs, config, model, optimizer, device, script: str) -> dict | None:
    """Load the stage's resumable checkpoint into `model` and `optimizer`; None when starting fresh.

    A checkpoint made with other model sizes is a UserError (use the same sizes or --fresh).
    """
    if args.fresh or not latest_path.exists():
        return None
    checkpoint = load_checkpoint(latest_path, map_location=device, stage_hint=f"{script} --fresh")
    if checkpoint["config"] != plain(config):
        raise UserError(f"{latest_path} was trained with {checkpoint['config']}, not {plain(config)}: "
                        "use the same settings or --fresh")
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    print(f"resuming from {latest_path}: epoch {checkpoint['epoch']}, best val loss {checkpoint['best_val_loss']:.4f}")
    return checkpoint


def resume_controller_checkpoint(latest_path: Path, fresh: bool, world_model_sha256: str, config, script: str,
                                 device="cpu", warm_start: bool = False) -> dict | None:
    """A controller stage's resumable checkpoint, or None to start over: with --fresh, when there is none
    yet, or when it was trained in an earlier world model (an on-policy round retrained it; said in a line).
    With `warm_start` that last one is returned instead, marked `warm_start`: its weights go on training in
    the current world model. Other controller settings are a UserError (use the same ones or --fresh)."""
    if fresh or not latest_path.exists():
        return None
    checkpoint = load_checkpoint(latest_path, map_location=device, stage_hint=f"{script} --fresh")
    if checkpoint.get("world_model", {}).get("sha256") != world_model_sha256:
        if not warm_start or checkpoint["config"] != plain(config):
            print(f"{latest_path} was trained in an earlier world model: starting over in the current one")
            return None
        print(f"{latest_path} was trained in an earlier world model: its weights go on training in the current one")
        return {**checkpoint, "warm_start": True}
    if checkpoint["config"] != plain(config):
        raise UserError(f"{latest_path} was trained with {checkpoint['config']}, not {plain(config)}: "
                        "use the same settings or --fresh")
    return checkpoint


# ----------------------------------------------------------------------------- seeding, devices


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto"):
    """`auto` takes CUDA when it is there, else the CPU; asking for CUDA without one is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"unknown device {name!r}: choose auto, cpu or cuda")
    return torch.device(name)


def plain(value: Any) -> Any:
    """A dataclass / Path / tuple turned into plain types, so `torch.load(weights_only=True)` reads it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ----------------------------------------------------------------------------- frames


def preprocess_frame(frame: np.ndarray) -> np.ndarray:
    """The one frame preprocessing (contract): a 96x96x3 uint8 CarRacing frame -> 64x64x3 uint8 RGB.

    The status bar (bottom 12 rows: speed, ABS, steering and gyro gauges) is kept, not cropped: it is
    the only place the frame shows speed, which a controller needs. INTER_AREA averages the 1.5x
    downscale instead of aliasing the thin track edges.
    """
    if frame.shape[-1] != 3 or frame.ndim != 3:
        raise ValueError(f"expected an HxWx3 frame, got shape {frame.shape}")
    return cv2.resize(frame, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)


# ----------------------------------------------------------------------------- atomic files, checkpoints


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write through `write(file)` to a temporary name in the same dir, fsync, then rename.

    A run killed at any moment leaves either the old file or the complete new one, never a half file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_identity(path: Path) -> dict:
    """How a downstream checkpoint names the upstream one it was trained on: path and content hash."""
    return {"path": str(path), "sha256": file_sha256(path)}


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    atomic_write(Path(path), lambda f: torch.save(checkpoint, f))


def load_checkpoint(path: Path, map_location="cpu", stage_hint: str = "") -> dict:
    """Load a checkpoint dict safely (weights_only); a missing or damaged file is a UserError."""
    path = Path(path)
    hint = f" (run {stage_hint} to make it)" if stage_hint else ""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found{hint}")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a truncated or foreign file
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({type(error).__name__}){hint}")
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "state_dict" not in checkpoint:
        raise UserError(f"checkpoint {path} lacks a config and state_dict: not made by this repo{hint}")
    return checkpoint


# ----------------------------------------------------------------------------- episode files


def episode_dir(data_dir: Path, source: str) -> Path:
    """Episodes of one collection source (`random`, `agent`, ...) live in data/rollouts/<source>/."""
    return Path(data_dir) / "rollouts" / source


def episode_path(data_dir: Path, source: str, track_seed: int) -> Path:
    return episode_dir(data_dir, source) / f"ep_{track_seed:07d}.npz"


def save_episode(path: Path, episode: dict) -> None:
    """Write one episode file (contract): compressed npz, atomically."""
    missing = set(EPISODE_KEYS) - set(episode)
    if missing:
        raise ValueError(f"episode lacks keys {sorted(missing)}")
    arrays = {
        "obs": np.asarray(episode["obs"], dtype=np.uint8),
        "action": np.asarray(episode["action"], dtype=np.float32),
        "reward": np.asarray(episode["reward"], dtype=np.float32),
        "terminated": np.asarray(episode["terminated"], dtype=bool),
        "truncated": np.asarray(episode["truncated"], dtype=bool),
        "seed": np.asarray(episode["seed"], dtype=np.int64),
        "action_repeat": np.asarray(episode.get("action_repeat", 1), dtype=np.int64),  # frames per step
    }
    check_episode_arrays(arrays)
    atomic_write(Path(path), lambda f: np.savez_compressed(f, **arrays))


EPISODE_SHAPES = {"obs": (FRAME_SIZE, FRAME_SIZE, 3), "action": (3,), "reward": (), "terminated": (),
                  "truncated": ()}  # per step


def check_episode_arrays(arrays: dict) -> None:
    """Raise ValueError unless the arrays present follow the episode contract (any subset of its keys)."""
    present = [key for key in EPISODE_SHAPES if key in arrays]
    steps = len(arrays[present[0]]) if present else 0
    if steps == 0:
        raise ValueError("an episode needs at least one step")
    if "obs" in arrays and arrays["obs"].dtype != np.uint8:
        raise ValueError(f"obs must be uint8, got {arrays['obs'].dtype}")
    for key in present:
        expected = (steps, *EPISODE_SHAPES[key])
        if arrays[key].shape != expected:
            raise ValueError(f"{key} must be {expected}, got {arrays[key].shape}")


def is_complete_npz(path: Path) -> bool:
    """Cheap check (reads the zip directory only) that a file is a whole npz with every episode key."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.removesuffix(".npy") for name in archive.namelist()}
        return set(EPISODE_KEYS) <= names
    except (OSError, zipfile.BadZipFile):
        return False


def load_episode(path: Path, keys: Sequence[str] = EPISODE_KEYS) -> dict | None:
    """Load one episode file; a corrupt, truncated or wrong-shaped one gives one warning and None.
    An optional key the file lacks (OPTIONAL_EPISODE_KEYS) gets its default."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:  # np.load leaks its handle on a bad zip
            arrays = {key: npz[key] if key in npz or key not in OPTIONAL_EPISODE_KEYS
                      else np.asarray(OPTIONAL_EPISODE_KEYS[key]) for key in keys}
        check_episode_arrays(arrays)
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        warnings.warn(f"skipping episode file {path}: {type(error).__name__}: {error}", stacklevel=2)
        return None


def list_episodes(data_dir: Path, sources: Sequence[str] | None = None) -> list[Path]:
    """Every episode file under data_dir/rollouts/<source>/ (all sources unless named), sorted."""
    root = Path(data_dir) / "rollouts"
    patterns = [f"{source}/ep_*.npz" for source in sources] if sources else ["*/ep_*.npz"]
    return sorted(path for pattern in patterns for path in root.glob(pattern))


def is_validation_episode(path: Path, val_percent: float) -> bool:
    """A stable split by episode: the file name's CRC decides, so it holds as the data set grows."""
    return zlib.crc32(Path(path).name.encode()) % 10_000 < val_percent * 100


def split_episodes(paths: Sequence[Path], val_percent: float) -> tuple[list[Path], list[Path]]:
    """Train / validation split by episode. With under two episodes both sets are the same one."""
    paths = list(paths)
    val = [p for p in paths if is_validation_episode(p, val_percent)]
    if not val and len(paths) >= 2 and val_percent > 0:
        val = [paths[-1]]  # tiny data sets: still hold one episode out
    train = [p for p in paths if p not in val]
    if not train:
        train, val = paths, paths
    return train, val


def episode_lengths(paths: Sequence[Path]) -> dict[Path, int]:
    """Steps per readable episode (reads only the small `reward` array); unreadable files are dropped."""
    lengths = {}
    for path in paths:
        arrays = load_episode(path, keys=("reward",))
        if arrays is not None:
            lengths[path] = len(arrays["reward"])
    return lengths


class FrameStream:
    """Shuffled uint8 frame batches streamed from episode files, with bounded memory.

    Each pass shuffles the episode order, loads `buffer_episodes` episodes at a time (the next group
    is decompressed in a background thread while the current one trains: zlib releases the GIL),
    shuffles their frames together and yields (batch, 64, 64, 3) uint8 arrays. Memory is about
    `2 * buffer_episodes` episodes whatever the size of the data set.
    """

    def __init__(self, paths: Sequence[Path], batch_size: int, buffer_episodes: int = 32, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        self.paths = list(paths)
        self.batch_size = batch_size
        self.buffer_episodes = max(1, buffer_episodes)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.rng = np.random.default_rng(seed)

    def _load_group(self, group: Sequence[Path]) -> np.ndarray:
        frames = [ep["obs"] for ep in (load_episode(p, keys=("obs",)) for p in group) if ep is not None]
        return np.concatenate(frames) if frames else np.zeros((0, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = self.rng.permutation(len(self.paths)) if self.shuffle else np.arange(len(self.paths))
        paths = [self.paths[i] for i in order]
        groups = [paths[i:i + self.buffer_episodes] for i in range(0, len(paths), self.buffer_episodes)]
        leftover = np.zeros((0, FRAME_SIZE, FRAME_SIZE, 3), np.uint8)
        with ThreadPoolExecutor(max_workers=1) as loader:
            pending = loader.submit(self._load_group, groups[0]) if groups else None
            for index in range(len(groups)):
                frames = pending.result()
                if index + 1 < len(groups):
                    pending = loader.submit(self._load_group, groups[index + 1])
                frames = np.concatenate([leftover, frames])
                if self.shuffle:
                    frames = frames[self.rng.permutation(len(frames))]
                usable = len(frames) - len(frames) % self.batch_size
                for start in range(0, usable, self.batch_size):
                    yield frames[start:start + self.batch_size]
                leftover = frames[usable:]
        if len(leftover) and not self.drop_last:
            yield leftover


def load_vae(path: Path, device="cpu"):
    """The ConvVAE of a checkpoint, rebuilt from its stored config, in eval mode: (model, checkpoint)."""
    checkpoint = load_checkpoint(path, map_location=device, stage_hint="train_vae.py")
    try:
        model = ConvVAE(ConvVAEConfig.from_dict(checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} is not a ConvVAE checkpoint ({type(error).__name__}); run train_vae.py")
    return model.to(device).eval(), checkpoint


def load_world_model(path: Path, device="cpu"):
    """The world model of a checkpoint, rebuilt from its stored config, in eval mode: (model, checkpoint)."""
    checkpoint = load_checkpoint(path, map_location=device, stage_hint="train_world_model.py")
    try:
        model = build_world_model(WorldModelConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} is not a world model checkpoint ({type(error).__name__}); "
                        "run train_world_model.py")
    return model.to(device).eval(), checkpoint


def load_vae_and_world_model(ckpt_dir: Path, device="cpu"):
    """VAE and world model of a checkpoint dir, checked to belong together: (vae, world_model, wm_checkpoint)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint dir {ckpt_dir} not found")
    vae, _ = load_vae(ckpt_dir / "vae.pt", device)
    world_model, checkpoint = load_world_model(ckpt_dir / "world_model.pt", device)
    if checkpoint["vae"]["sha256"] != file_sha256(ckpt_dir / "vae.pt"):
        raise UserError(f"{ckpt_dir / 'world_model.pt'} was trained on another VAE than {ckpt_dir / 'vae.pt'}: "
                        "re-run train_world_model.py")
    return vae, world_model, checkpoint


ControllerName = Literal["ppo", "ppo_dream", "cmaes"]  # the controllers a checkpoint dir can hold
CONTROLLER_SCRIPTS = {"ppo": "train_ppo.py", "ppo_dream": "train_ppo_in_dream.py",
                      "cmaes": "train_cmaes_in_dream.py"}  # controller name -> the stage that trains it
assert tuple(CONTROLLER_SCRIPTS) == get_args(ControllerName)


def controller_path(ckpt_dir: Path, name: str) -> Path:
    return Path(ckpt_dir) / f"controller_{name}.pt"


PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"  # the shipped agent


def agent_dir_and_controller(ckpt_dir: Path | None, controller: str | None) -> tuple[Path, str]:
    """The agent a watching/evaluation script plays: CKPT_DIR (default: pretrained/) and the controller
    named, or else the first of CONTROLLER_SCRIPTS' order that CKPT_DIR holds."""
    ckpt_dir = PRETRAINED_DIR if ckpt_dir is None else Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint dir {ckpt_dir} not found" +
                        (": no agent has been shipped yet, pass --ckpt-dir checkpoints" if ckpt_dir == PRETRAINED_DIR
                         else ""))
    if controller is None:
        found = [name for name in CONTROLLER_SCRIPTS if controller_path(ckpt_dir, name).exists()]
        if not found:
            raise UserError(f"no controller_*.pt in {ckpt_dir}: train one ({', '.join(CONTROLLER_SCRIPTS.values())})")
        controller = found[0]
    return ckpt_dir, controller


class FeatureTracker:
    """The agent's features [z, h] for B envs: z is the VAE's mu of the current frame, h the world
    model's memory of the (z, action) pairs so far. Per step: `observe(frames)` -> [z, h], the
    controller acts, `remember(actions)` steps the world model so h includes that step."""

    def __init__(self, vae, world_model, batch: int = 1, device="cpu"):
        self.vae, self.world_model, self.device = vae, world_model, device
        self.state = world_model.initial_state(batch, device)
        self.z = torch.zeros(batch, world_model.config.latent_dim, device=device)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Preprocessed frames (B, 64, 64, 3) uint8 -> z (B, latent_dim), the VAE's mean."""
        return self.vae.encode(ConvVAE.to_input(torch.as_tensor(frames, device=self.device)))[0]

    def observe(self, frames: np.ndarray) -> torch.Tensor:
        self.z = self.encode(frames)
        return torch.cat([self.z, self.world_model.features(self.state)], -1)

    @torch.no_grad()
    def remember(self, actions: torch.Tensor) -> None:
        _, self.state = self.world_model.step(self.z, actions, self.state)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Forget the past of the envs where `mask` (B,) is set (all if None)."""
        initial = self.world_model.initial_state(len(self.state), self.device)
        self.state = initial if mask is None else torch.where(mask[:, None].to(self.device), initial, self.state)


class Agent:
    """VAE + world model + controller: preprocessed 64x64 frames in, actions out, h carried along.

    The collection-policy interface: `reset(seed)`, then `agent(frame)` per frame: with `action_repeat` k
    the agent decides on frames 0, k, 2k, ... and holds each action in between, as it was trained
    (the frames in between are not encoded, and h steps once per decision). `agent.act(frame)` decides
    on every frame it is given, for an env that holds each action for k frames itself (ActionRepeat).
    """

    def __init__(self, vae, world_model, controller, device="cpu", action_repeat: int = 1):
        self.controller, self.action_repeat = controller, action_repeat
        self.features = FeatureTracker(vae, world_model, 1, device)
        self.frame_count, self.action = 0, None

    def reset(self, seed: int | None = None) -> None:
        self.features.reset()
        self.frame_count = 0

    @torch.no_grad()
    def act(self, frame: np.ndarray) -> np.ndarray:
        """One decision on a preprocessed frame (64, 64, 3): the action (3,), h stepped once."""
        action = self.controller(self.features.observe(frame[None]))
        self.features.remember(action)
        self.action = action[0].cpu().numpy().astype(np.float32)
        return self.action

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.frame_count % self.action_repeat == 0:
            self.act(frame)
        self.frame_count += 1
        return self.action


def load_agent(ckpt_dir: Path, controller: str, device="cpu") -> Agent:
    """The one way every consumer builds an agent; a mismatch of any part is a UserError."""
    if controller not in CONTROLLER_SCRIPTS:
        raise UserError(f"unknown controller {controller!r}: choose one of {', '.join(CONTROLLER_SCRIPTS)}")
    vae, world_model, wm_checkpoint = load_vae_and_world_model(ckpt_dir, device)
    path = controller_path(ckpt_dir, controller)
    checkpoint = load_checkpoint(path, map_location=device, stage_hint=CONTROLLER_SCRIPTS[controller])
    try:
        config = ControllerConfig(**checkpoint["config"])
        model = build_controller(config)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} is not a controller checkpoint ({type(error).__name__}); "
                        f"run {CONTROLLER_SCRIPTS[controller]}")
    for part in ("vae", "world_model"):
        if checkpoint.get(part, {}).get("sha256") != file_sha256(Path(ckpt_dir) / f"{part}.pt"):
            raise UserError(f"{path} was trained with another {part.replace('_', ' ')} than {Path(ckpt_dir) / part}.pt:"
                            f" re-run {CONTROLLER_SCRIPTS[controller]}")
    # one clock: the controller decides at the world model's rate (a world model saved before the rate was
    # recorded does not say it, and the controller's own is taken)
    if "action_repeat" in wm_checkpoint["config"] and config.action_repeat != world_model.config.action_repeat:
        raise UserError(f"{path} decides every {config.action_repeat} frames but {Path(ckpt_dir) / 'world_model.pt'} "
                        f"steps every {world_model.config.action_repeat}: re-run {CONTROLLER_SCRIPTS[controller]}")
    return Agent(vae, world_model, model.to(device).eval(), device, config.action_repeat)


def frames_grid(rows: Sequence[np.ndarray], scale: int = 2) -> np.ndarray:
    """Rows of (N, H, W, 3) uint8 frames -> one uint8 image, rows stacked, upscaled for viewing."""
    image = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    return np.kron(image, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else image


# ----------------------------------------------------------------------------- latent cache

LATENT_KEYS = ("mu", "logvar", "action", "reward", "terminated", "truncated", "vae_sha256", "action_repeat")


def latent_cache_path(data_dir: Path, vae_sha256: str, episode: Path) -> Path:
    """Latents of an episode under DATA_DIR/latents/<VAE hash>/<source>/: a new VAE gets a new cache."""
    episode = Path(episode)
    return Path(data_dir) / "latents" / vae_sha256[:16] / episode.parent.name / episode.name


def load_latent_episode(path: Path, vae_sha256: str | None = None, warn: bool = True) -> dict | None:
    """A cached latent episode, or None (with a warning if `warn`) when unreadable or made by another VAE."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = {key: npz[key] if key in npz or key not in OPTIONAL_EPISODE_KEYS
                      else np.asarray(OPTIONAL_EPISODE_KEYS[key]) for key in LATENT_KEYS}
        if vae_sha256 is not None and str(arrays["vae_sha256"]) != vae_sha256:
            raise ValueError("made by another VAE")
        if arrays["mu"].shape != arrays["logvar"].shape or len(arrays["mu"]) != len(arrays["reward"]):
            raise ValueError(f"inconsistent shapes {arrays['mu'].shape} {arrays['reward'].shape}")
        return arrays
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        if warn:
            warnings.warn(f"skipping latent file {path}: {type(error).__name__}: {error}", stacklevel=2)
        return None


def encode_episodes(vae, vae_sha256: str, episodes: Sequence[Path], data_dir: Path, device="cpu",
                    batch_size: int = 512, progress: bool = True) -> dict[Path, Path]:
    """Encode each episode's frames once into (mu, logvar), cached per VAE; returns {episode: cache file}.

    Files already cached by this VAE are reused; missing, damaged or foreign ones are (re)built, one
    atomic file per episode, so a killed encode resumes where it stopped.
    """
    cached = {path: latent_cache_path(data_dir, vae_sha256, path) for path in episodes}
    missing = [path for path, cache in cached.items()
               if not (cache.exists() and load_latent_episode(cache, vae_sha256, warn=False) is not None)]
    for path in tqdm(missing, desc="encode latents", unit="ep", disable=not progress or not missing,
                     dynamic_ncols=True):
        episode = load_episode(path, (*EPISODE_KEYS, "action_repeat"))
        if episode is None:
            continue
        mus, logvars = [], []
        with torch.no_grad():
            for start in range(0, len(episode["obs"]), batch_size):
                frames = torch.from_numpy(episode["obs"][start:start + batch_size]).to(device)
                mu, logvar = vae.encode(ConvVAE.to_input(frames))
                mus.append(mu.cpu().numpy()), logvars.append(logvar.cpu().numpy())
        arrays = {"mu": np.concatenate(mus), "logvar": np.concatenate(logvars), "vae_sha256": np.array(vae_sha256),
                  **{key: episode[key] for key in ("action", "reward", "terminated", "truncated", "action_repeat")}}
        atomic_write(cached[path], lambda f: np.savez(f, **arrays))
    return {path: cache for path, cache in cached.items() if cache.exists()}
