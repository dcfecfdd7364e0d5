"""Does a VAE's latent hold the dashboard's gauges? A linear probe from mu to each gauge's reading.

CarRacing draws the car's speed, its four wheels' spin (ABS), the steering angle and the yaw rate as
bars in the bottom eighth of the frame; at 64x64 the speed bar is two pixels wide and a few high. A VAE
that blurs it gives the controller a z without the speed. Each gauge's reading is taken from the
frame's own pixels (the summed intensity of its columns of the strip; the steering bar's side gives
its sign), a least-squares probe from the VAE's mu (with squares, 65 features) is fitted on the frames
of half of the held-out episodes, and its R^2 is measured on the other half. Also the reconstruction
error of the whole frame and of the strip, decoding mu.

Reads:  DATA_DIR/rollouts/*/ep_*.npz (the held-out episodes of train_vae.py's split), the VAE checkpoints.
Writes: a table on stdout.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from agent import load_vae
from conv_vae import ConvVAE, dashboard_rows
from episodes import list_episodes, load_episode, split_episodes
from utils import UserError, run_main

# columns of each gauge in the 64x64 frame's dashboard rows 56-63 (CarRacing draws them at x = 5, 7-10, 20 and 30
# times 96/40 pixels of the 96x96 frame)
GAUGE_COLUMNS = {"speed": (8, 10), "abs": (10, 18), "steering": (20, 44), "gyro": (44, 60)}


@dataclass
class Args:
    vae: list[Path] = field(default_factory=lambda: [Path("checkpoints/vae.pt")])
    """the VAE checkpoints to compare"""
    data_dir: Path = Path("data")
    """episodes; the probe uses the held-out ones of train_vae.py's split"""
    val_percent: float = 5.0
    """the split train_vae.py used (its --val-percent)"""
    stride: int = 2
    """every STRIDE-th frame of each held-out episode"""


def gauge_readings(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Each gauge's reading (B,) from uint8 frames (B, 64, 64, 3): the summed grey level of its columns of the strip."""
    strip = frames[:, dashboard_rows(frames.shape[1])].astype(np.float32).mean(-1)  # (B, 8, 64)
    readings = {name: strip[:, :, lo:hi].sum((1, 2)) for name, (lo, hi) in GAUGE_COLUMNS.items()}
    left, right = strip[:, :, 20:32].sum((1, 2)), strip[:, :, 32:44].sum((1, 2))
    readings["steering"] *= np.sign(right - left)  # the bar grows from the middle, left or right
    return readings


def probe_r2(features: np.ndarray, target: np.ndarray, train: np.ndarray) -> float:
    """R^2 on the frames outside `train` of a least-squares fit on those inside (features get a constant)."""
    x = np.c_[features, np.ones(len(features))]
    weights = np.linalg.lstsq(x[train], target[train], rcond=None)[0]
    residual = target[~train] - x[~train] @ weights
    return float(1 - residual.var() / max(target[~train].var(), 1e-12))


def main(args: Args) -> None:
    torch.set_grad_enabled(False)
    _, held_out = split_episodes(list_episodes(args.data_dir), args.val_percent)
    episodes = [ep["obs"][::args.stride] for ep in (load_episode(p, keys=("obs",)) for p in held_out) if ep is not None]
    if len(episodes) < 2:
        raise UserError(f"{args.data_dir} has {len(episodes)} held-out episode(s); the probe needs 2 or more")
    frames = np.concatenate(episodes)
    # fit on the first half of the episodes, score on the rest: frames of one episode stay on one side
    train = np.arange(len(frames)) < sum(len(ep) for ep in episodes[:len(episodes) // 2])
    readings = gauge_readings(frames)
    print(f"{len(frames)} frames of {len(episodes)} held-out episodes of {args.data_dir}; probe fitted on "
          f"{train.sum()} frames, R^2 on the other {(~train).sum()}\n")
    print("| VAE | recon | dashboard | " + " | ".join(f"R^2 {name}" for name in readings) + " |")
    print("|---" * (3 + len(readings)) + "|")
    for path in args.vae:
        model, _ = load_vae(path)
        mus, recon, dashboard = [], 0.0, 0.0
        for start in range(0, len(frames), 256):
            x = ConvVAE.to_input(torch.from_numpy(frames[start:start + 256]))
            losses = model.loss(x, sample=False)
            recon, dashboard = recon + losses["recon"].item() * len(x), dashboard + losses["dashboard"].item() * len(x)
            mus.append(model.encode(x)[0].numpy())
        mu = np.concatenate(mus)
        features = np.c_[mu, mu ** 2]
        r2 = " | ".join(f"{probe_r2(features, reading, train):.3f}" for reading in readings.values())
        print(f"| {path} | {recon / len(frames):.2f} | {dashboard / len(frames):.2f} | {r2} |")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
