"""Episode files and the latent cache: the episode contract (one atomic compressed npz per track seed,
keys and shapes checked on read and write), listing and the stable train/validation split, frame
streaming for the VAE, and each episode's VAE latents cached per VAE for the world model.
"""

from __future__ import annotations

import io
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from conv_vae import ConvVAE
from utils import FRAME_SIZE, atomic_write

EPISODE_KEYS = ("obs", "action", "reward", "terminated", "truncated", "seed")


# Optional keys and the value a file without them means: episodes collected before the decision clock
# was recorded held each action for 1 frame.
OPTIONAL_EPISODE_KEYS = {"action_repeat": 1}


def episode_dir(data_dir: Path, source: str) -> Path:
    """Episodes of one collection source (`random`, `agent`, ...) live in data/rollouts/<source>/."""
    return Path(data_dir) / "rollouts" / source


def episode_path(data_dir: Path, source: str, track_seed: int) -> Path:
    return episode_dir(data_dir, source) / f"ep_{track_seed:07d}.npz"


def encode_episode(episode: dict) -> bytes:
    """One episode file's bytes (contract): a compressed npz, checked first, so a wrong episode never becomes
    a file (a cluster node encodes, the driver writes them with save_episode)."""
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
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def save_episode(path: Path, episode: dict | bytes) -> None:
    """Write one episode file atomically: from the episode, or from encode_episode's bytes."""
    data = episode if isinstance(episode, bytes) else encode_episode(episode)
    atomic_write(Path(path), lambda f: f.write(data))


EPISODE_SHAPES = {"obs": (FRAME_SIZE, FRAME_SIZE, 3), "action": (3,), "reward": (), "terminated": (),
                  "truncated": ()}  # per step (the latent cache's mu and logvar: (latent_dim,), checked apart)


EPISODE_KINDS = {"obs": "u", "action": "f", "reward": "f", "terminated": "b", "truncated": "b"}  # numpy dtype kinds


def check_episode_arrays(arrays: dict) -> None:
    """Raise ValueError unless the arrays present follow the episode contract (any subset of its keys)."""
    present = [key for key in EPISODE_SHAPES if key in arrays]
    if any(arrays[key].ndim == 0 for key in present):
        raise ValueError("an episode's arrays have one entry per step, not a single value")
    steps = len(arrays[present[0]]) if present else 0
    if steps == 0:
        raise ValueError("an episode needs at least one step")
    for key in present:
        expected = (steps, *EPISODE_SHAPES[key])
        if arrays[key].shape != expected:
            raise ValueError(f"{key} must be {expected}, got {arrays[key].shape}")
        kind = arrays[key].dtype.kind
        if kind not in EPISODE_KINDS[key] or (key == "obs" and arrays[key].dtype != np.uint8):
            raise ValueError(f"{key} must be of dtype kind {EPISODE_KINDS[key]!r}, got {arrays[key].dtype}")
        if kind == "f" and not np.isfinite(arrays[key]).all():
            raise ValueError(f"{key} holds NaN or inf")


def is_complete_npz(path: Path) -> bool:
    """Cheap check (reads the zip directory only) that a file is a whole npz with every episode key."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {name.removesuffix(".npy") for name in archive.namelist()}
        return set(EPISODE_KEYS) <= names
    except (OSError, zipfile.BadZipFile):
        return False


def read_members(npz, keys: Sequence[str], known: Sequence[str]) -> dict:
    """KEYS of an open npz; an optional key the file lacks (OPTIONAL_EPISODE_KEYS) gets its default. A member
    name outside KNOWN is damage (a name garbled in the zip directory would otherwise pass for a missing
    optional key and load its default silently): ValueError."""
    foreign, names = set(npz.files) - set(known), npz.zip.namelist()
    if foreign or len(set(names)) != len(names):
        raise ValueError(f"members {sorted(names)} are not those of this contract (or repeat a name)")
    return {key: npz[key] if key in npz or key not in OPTIONAL_EPISODE_KEYS else np.asarray(OPTIONAL_EPISODE_KEYS[key])
            for key in keys}


def load_episode(path: Path, keys: Sequence[str] = EPISODE_KEYS) -> dict | None:
    """Load one episode file; a corrupt, truncated or wrong-shaped one gives one warning and None.
    An optional key the file lacks (OPTIONAL_EPISODE_KEYS) gets its default."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:  # np.load leaks its handle on a bad zip
            arrays = read_members(npz, keys, (*EPISODE_KEYS, *OPTIONAL_EPISODE_KEYS))
        check_episode_arrays(arrays)
        return arrays
    except Exception as error:  # whatever reading one file raises (zip, zlib, npy header parsing) means damage
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


LATENT_KEYS = ("mu", "logvar", "action", "reward", "terminated", "truncated", "vae_sha256", "action_repeat")


def latent_cache_path(data_dir: Path, vae_sha256: str, episode: Path) -> Path:
    """Latents of an episode under DATA_DIR/latents/<VAE hash>/<source>/: a new VAE gets a new cache."""
    episode = Path(episode)
    return Path(data_dir) / "latents" / vae_sha256[:16] / episode.parent.name / episode.name


def load_latent_episode(path: Path, vae_sha256: str | None = None, warn: bool = True) -> dict | None:
    """A cached latent episode, or None (with a warning if `warn`) when unreadable or made by another VAE."""
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            arrays = read_members(npz, LATENT_KEYS, LATENT_KEYS)
        if vae_sha256 is not None and str(arrays["vae_sha256"]) != vae_sha256:
            raise ValueError("made by another VAE")
        check_episode_arrays(arrays)  # action, reward and flags: shapes, dtypes, finite
        mu, logvar = arrays["mu"], arrays["logvar"]
        if mu.ndim != 2 or mu.shape != logvar.shape or len(mu) != len(arrays["reward"]):
            raise ValueError(f"inconsistent shapes: mu {mu.shape}, logvar {logvar.shape}, "
                             f"reward {arrays['reward'].shape}")
        if not all(x.dtype.kind == "f" and np.isfinite(x).all() for x in (mu, logvar)):
            raise ValueError("mu and logvar must be finite floats")
        return arrays
    except Exception as error:  # whatever reading one file raises (zip, zlib, npy header parsing) means damage
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
