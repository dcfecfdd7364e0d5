"""Helpers every stage shares: one-line user errors and the stage entry point, stage set-up and resume,
seeding and devices, the frame preprocessing, atomic files and checkpoints.

What the project is about lives in modules named after it: episodes.py (episode files, latent cache),
agent.py (loading an agent, its features), envs.py (the real env and its wrappers), rollouts.py
(collection and evaluation), dream.py (the world model as an env), utils_rl.py (PPO).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import random
import signal
import sys
import uuid
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import cv2
import numpy as np
import torch


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
    """seed of torch, numpy and the data order"""
    device: str = "auto"
    """auto (CUDA when there is one), cpu, cuda or cuda:N"""
    threads: int = 0
    """torch CPU threads (0: torch's default, one per core)"""
    fresh: bool = False
    """ignore the stage's *_latest.pt checkpoint and start over"""
    collect: bool = True
    """collect random episodes first when DATA_DIR has none"""
    collect_episodes: int = 800
    """episodes to collect when DATA_DIR is empty"""
    collect_max_steps: int = 1000
    """episode length in frames of that collection"""
    workers: int = 2
    """collection worker processes"""
    env_backend: str = "fast"
    """fast (pixel-exact CarRacing-v3, faster), gymnasium (stock) or envpool (approximate clone)"""


def setup_stage(args) -> torch.device:
    """Seed everything, remove the temporaries a killed run left in CKPT_DIR, set the torch threads and return
    the device (args: any stage's, with seed, ckpt_dir, threads and device)."""
    seed_everything(args.seed)
    remove_stale_temps(args.ckpt_dir)
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def resume_checkpoint(latest_path: Path, best_path: Path, args: StageArgs, config, model, optimizer, device,
                      script: str) -> dict | None:
    """Load the stage's resumable checkpoint into `model` and `optimizer`; None when starting fresh.
    A best checkpoint that a kill kept from being written is written first (finish_saving).

    A checkpoint made with other model sizes is a UserError (use the same sizes or --fresh).
    """
    if args.fresh or not latest_path.exists():
        return None
    checkpoint = load_checkpoint(latest_path, map_location=device, stage_hint=f"{script} --fresh")
    try:  # a setting added since the checkpoint was made has its default value there
        saved = plain(type(config)(**checkpoint["config"]))
    except TypeError:  # (a setting this code no longer knows)
        saved = checkpoint["config"]
    if saved != plain(config):
        raise UserError(f"{latest_path} was trained with {checkpoint['config']}, not {plain(config)}: "
                        "use the same settings or --fresh")
    finish_saving(best_path, checkpoint, ("optimizer",))
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    print(f"resuming from {latest_path}: epoch {checkpoint['epoch']}, best val loss {checkpoint['best_val_loss']:.4f}")
    return checkpoint


def resume_controller_checkpoint(latest_path: Path, out_path: Path, fresh: bool, world_model_sha256: str, config,
                                 script: str, device="cpu", warm_start: bool = False) -> dict | None:
    """A controller stage's resumable checkpoint, or None to start over: with --fresh, when there is none
    yet, or when it was trained in an earlier world model (an on-policy round retrained it; said in a line).
    With `warm_start` that last one is returned instead, marked `warm_start`: its weights go on training in
    the current world model. Other controller settings are a UserError (use the same ones or --fresh).
    A controller that a kill kept from being written is written first (finish_saving)."""
    if fresh or not latest_path.exists():
        return None
    checkpoint = load_checkpoint(latest_path, map_location=device, stage_hint=f"{script} --fresh")
    finish_saving(out_path, checkpoint, CONTROLLER_RESUME_KEYS)
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


CONTROLLER_RESUME_KEYS = ("optimizer", "reward_scaler", "es_state", "trained_state_dict",
                          "averaged_model", "best_check")  # in *_latest.pt only, not in controller_*.pt


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str = "auto"):
    """`auto` takes CUDA when it is there, else the CPU; `cuda` or `cuda:N` without such a device is a UserError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (colon and (kind == "cpu" or not index.isdigit())):
        raise UserError(f"unknown device {name!r}: choose auto, cpu, cuda or cuda:N")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {name} was asked for but torch sees no CUDA device; use --device cpu")
        if index and int(index) >= count:
            raise UserError(f"--device {name} was asked for but torch sees {count} CUDA device(s): cuda:0 .. "
                            f"cuda:{count - 1}")
    return torch.device(name)


Precision = Literal["fp32", "bf16"]


def autocast(device: torch.device | str, precision: Precision) -> contextlib.AbstractContextManager:
    """Where the networks' matrix products and convolutions run in PRECISION: fp32 (nothing changes) or bf16 mixed
    precision (torch.autocast; weights, optimiser state and what the models return stay fp32). On this CPU (AVX-512
    BF16) bf16 trains the VAE, the world model and PPO's update faster (README, Precision)."""
    if precision not in ("fp32", "bf16"):
        raise UserError(f"unknown precision {precision!r}: choose fp32 or bf16")
    if precision == "fp32":
        return contextlib.nullcontext()  # (the fp32 path stays exactly what it was before bf16 existed)
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


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


FRAME_SIZE = 64  # the VAE's input is FRAME_SIZE x FRAME_SIZE RGB


def preprocess_frame(frame: np.ndarray) -> np.ndarray:
    """The one frame preprocessing (contract): a 96x96x3 uint8 CarRacing frame -> 64x64x3 uint8 RGB.

    The status bar (bottom 12 rows: speed, ABS, steering and gyro gauges) is kept, not cropped: it is
    the only place the frame shows speed, which a controller needs. INTER_AREA averages the 1.5x
    downscale instead of aliasing the thin track edges.
    """
    if frame.shape[-1] != 3 or frame.ndim != 3:
        raise ValueError(f"expected an HxWx3 frame, got shape {frame.shape}")
    return cv2.resize(frame, (FRAME_SIZE, FRAME_SIZE), interpolation=cv2.INTER_AREA)


def frames_grid(rows: Sequence[np.ndarray], scale: int = 2) -> np.ndarray:
    """Rows of (N, H, W, 3) uint8 frames -> one uint8 image, rows stacked, upscaled for viewing."""
    image = np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)
    return np.kron(image, np.ones((scale, scale, 1), np.uint8)) if scale > 1 else image


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name in PATH's dir (same suffix, for writers that pick the format by it) that becomes PATH
    when the block ends without an error, and is removed otherwise.

    A run killed at any moment leaves either the old file or the complete new one, never a half file; a
    temporary left by a killed process is removed by the next stage that starts (remove_stale_temps).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as error:  # a full disk or a file-size limit: name the file the user will look for
        cause = _os_error_in(error)  # (torch.save turns a failed write into a RuntimeError with the OSError inside)
        if cause is None:
            raise
        raise OSError(cause.errno, f"{cause.strerror or cause} while writing (the previous file, if any, is intact)",
                      str(path)) from error
    finally:
        tmp.unlink(missing_ok=True)


def _os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError an exception is, or the one a RuntimeError wraps (torch.save reports a failed write so)."""
    while isinstance(error, RuntimeError):
        error = error.__cause__ or error.__context__
    return error if isinstance(error, OSError) else None


def atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file through `write(file)`, atomically (atomic_path)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


def remove_stale_temps(directory: Path) -> None:
    """Remove the temporaries atomic_path left in DIRECTORY when its process was killed (never one whose
    process still runs: parallel workers write beside each other)."""
    for tmp in Path(directory).glob(".*.tmp-*"):
        pid = tmp.name.rsplit(".tmp-", 1)[1].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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


def stage_checkpoint(config, model, args, log_dir: Path, **fields) -> dict:
    """The one checkpoint layout (contract): the model's config and weights, the stage's args and log dir,
    as plain types (`torch.load(weights_only=True)` reads them), and the stage's own FIELDS."""
    return {"config": plain(config), "state_dict": model.state_dict(), "args": plain(args), "log_dir": str(log_dir),
            **fields}


def save_stage(out_path: Path, latest_path: Path, checkpoint: dict, resume_state: dict, write_out: bool = True) -> None:
    """Save a step of a stage: LATEST_PATH (the checkpoint plus RESUME_STATE: optimizer, ...) first, then
    OUT_PATH (the checkpoint the next stage reads) when WRITE_OUT. A kill between the two leaves a latest that
    says its output is due, and the re-run writes that output (finish_saving) instead of training it again:
    re-training would give other weights, and a new VAE or world model invalidates every stage after it."""
    save_id = uuid.uuid4().hex
    save_checkpoint(latest_path, {**checkpoint, **resume_state, "save_id": save_id, "out_due": write_out})
    if write_out:
        save_checkpoint(out_path, {**checkpoint, "save_id": save_id})


def finish_saving(out_path: Path, latest: dict, resume_keys: Sequence[str]) -> None:
    """The half of save_stage a kill interrupted: OUT_PATH from the LATEST checkpoint, if it was due."""
    if not latest.get("out_due"):
        return
    try:
        done = torch.load(out_path, map_location="cpu", weights_only=True).get("save_id") == latest.get("save_id")
    except Exception:  # missing or damaged: write it
        done = False
    if not done:
        print(f"{out_path} was not written before the last run stopped: writing it from its latest checkpoint")
        save_checkpoint(out_path, {key: value for key, value in latest.items()
                                   if key not in (*resume_keys, "out_due", "warm_start")})


def verify_zip(path: Path) -> None:
    """Raise unless every member of the zip at PATH reads back whole: its CRC, and its local header's name
    against the directory's (read entry by entry: a name garbled into another member's would hide it from a
    read by name), with no name twice."""
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len({member.filename for member in members}) != len(members):
            raise ValueError("a member name appears twice")
        for member in members:
            with archive.open(member) as data:
                while data.read(1 << 20):
                    pass


def load_checkpoint(path: Path, map_location="cpu", stage_hint: str = "") -> dict:
    """Load a checkpoint dict safely (weights_only); a missing or damaged file is a UserError."""
    path = Path(path)
    hint = f" (run {stage_hint} to make it)" if stage_hint else ""
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found{hint}")
    try:  # torch does not check the zip's CRCs: a flipped byte in the weights would load as other weights
        verify_zip(path)
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch and zipfile raise several types for a truncated or foreign file
        raise UserError(f"checkpoint {path} is damaged or not a checkpoint ({type(error).__name__}){hint}")
    if (not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("config"), dict)
            or not isinstance(checkpoint.get("state_dict"), dict)):
        raise UserError(f"checkpoint {path} lacks a config and state_dict: not made by this repo{hint}")
    if not all(isinstance(value, torch.Tensor) for value in checkpoint["state_dict"].values()):
        raise UserError(f"checkpoint {path} has a state_dict of other things than tensors: not made by this repo{hint}")
    if not all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values() if value.is_floating_point()):
        raise UserError(f"checkpoint {path} holds NaN or inf weights: a diverged run; retrain it{hint}")
    return checkpoint
