"""Train the ConvVAE (V) on collected frames.

Reads:  DATA_DIR/rollouts/*/ep_*.npz (collects random episodes first if there are none).
Writes: CKPT_DIR/vae.pt (best validation loss), CKPT_DIR/vae_latest.pt (every epoch, with the
        optimizer: re-running resumes from it), CKPT_DIR/vae_recon.png (validation frames over
        their reconstructions, newest epoch), and TensorBoard logs plus a recon PNG per epoch
        under LOG_DIR/vae-<time>/.

Frames stay uint8 and are streamed from the episode files a few dozen episodes at a time, so a
data set larger than RAM trains too. Train and validation are split by episode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from tqdm import tqdm

from conv_vae import ConvVAE, ConvVAEConfig
from episodes import FrameStream, episode_lengths, load_episode, split_episodes
from rollouts import find_or_collect_episodes
from utils import (
    Precision,
    StageArgs,
    UserError,
    atomic_write,
    autocast,
    frames_grid,
    plain,
    resume_checkpoint,
    run_main,
    save_stage,
    setup_stage,
    stage_checkpoint,
)


@dataclass
class Args(StageArgs):
    epochs: int = 3
    """total epochs (a resumed run trains up to this many)"""
    batch_size: int = 128
    """frames per training batch"""
    lr: float = 1e-3
    """Adam learning rate"""
    latent_dim: int = 32
    """size of z, the VAE's latent"""
    kl_tolerance: float = 0.5
    """free bits per latent dim (0 disables the floor)"""
    dashboard_weight: float = 4.0
    """weight of the dashboard rows (speed, ABS, steering, gyro gauges) in the reconstruction loss; 1 = the original"""
    val_percent: float = 5.0
    """share of episodes held out for validation (split by episode, stable as data grows)"""
    val_frames: int = 2048
    """validation frames evaluated each epoch, evenly spread over the held-out episodes"""
    buffer_episodes: int = 32
    """episodes decompressed and shuffled together: bounds memory (about 12 MB per 1000-step episode)"""
    precision: Precision = "fp32"
    """training arithmetic of the convolutions: fp32, or bf16 mixed precision (weights, optimizer and loss stay fp32;
    validation runs in fp32)"""


def train_step(model: ConvVAE, optimizer: torch.optim.Optimizer, frames: np.ndarray, device,
               precision: Precision = "fp32") -> dict[str, float]:
    """One optimisation step on a batch of uint8 frames (B, 64, 64, 3), the networks in PRECISION."""
    x = ConvVAE.to_input(torch.from_numpy(frames).to(device))
    with autocast(device, precision):
        losses = model.loss(x)
    optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    optimizer.step()
    return {name: value.item() for name, value in losses.items()}


@torch.no_grad()
def evaluate(model: ConvVAE, frames: np.ndarray, device, batch_size: int = 256) -> dict[str, float]:
    """Mean validation figures over `frames`, decoding mu (deterministic)."""
    model.eval()
    totals = {"loss": 0.0, "recon": 0.0, "dashboard": 0.0, "kl": 0.0}
    for start in range(0, len(frames), batch_size):
        batch = frames[start:start + batch_size]
        losses = model.loss(ConvVAE.to_input(torch.from_numpy(batch).to(device)), sample=False)
        for name in totals:
            totals[name] += losses[name].item() * len(batch)
    model.train()
    return {name: total / len(frames) for name, total in totals.items()}


@torch.no_grad()
def reconstruction_png(model: ConvVAE, frames: np.ndarray, device) -> np.ndarray:
    """Originals (top row) over their reconstructions from mu (bottom row)."""
    model.eval()
    mu, _ = model.encode(ConvVAE.to_input(torch.from_numpy(frames).to(device)))
    recon = model.decode_frames(mu)
    model.train()
    return frames_grid([frames, recon], scale=2)


def validation_frames(paths: list[Path], count: int) -> np.ndarray:
    """`count` frames evenly spread over the validation episodes (a fixed set, the same every epoch)."""
    frames = [ep["obs"] for ep in (load_episode(p, keys=("obs",)) for p in paths) if ep is not None]
    if not frames:
        raise UserError("no readable validation episode")
    frames = np.concatenate(frames)
    return frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).astype(int)]


def main(args: Args) -> None:
    device = setup_stage(args)
    if args.epochs < 1 or args.batch_size < 1:
        raise UserError("--epochs and --batch-size must be at least 1")
    config = ConvVAEConfig(latent_dim=args.latent_dim, kl_tolerance=args.kl_tolerance,
                           dashboard_weight=args.dashboard_weight)
    model = ConvVAE(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    latest_path, best_path = args.ckpt_dir / "vae_latest.pt", args.ckpt_dir / "vae.pt"

    resumed = resume_checkpoint(latest_path, best_path, args, config, model, optimizer, device, "train_vae.py")
    start_epoch, best_val, log_dir = ((resumed["epoch"], resumed["best_val_loss"], Path(resumed["log_dir"])) if resumed
                                      else (0, math.inf, args.log_dir / f"vae-{time.strftime('%Y%m%d-%H%M%S')}"))
    if start_epoch >= args.epochs:
        print(f"{latest_path} has already trained {start_epoch} epochs (--epochs {args.epochs}); nothing to do")
        return

    lengths = episode_lengths(find_or_collect_episodes(args.data_dir, args.collect, args.collect_episodes,
                                                       args.collect_max_steps, args.workers, args.env_backend))
    train_paths, val_paths = split_episodes(sorted(lengths), args.val_percent)
    if not lengths:
        raise UserError(f"no readable episode in {args.data_dir}/rollouts/")
    train_frames = sum(lengths[p] for p in train_paths)
    val_set = validation_frames(val_paths, args.val_frames)
    print(f"data: {len(train_paths)} train episodes ({train_frames} frames), {len(val_paths)} validation "
          f"episodes ({len(val_set)} frames evaluated); model {sum(p.numel() for p in model.parameters()):,} "
          f"parameters on {device}; logs in {log_dir}")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    writer.add_text("args", str(plain(args)))
    step = start_epoch * (train_frames // args.batch_size)
    for epoch in range(start_epoch, args.epochs):
        stream = FrameStream(train_paths, args.batch_size, args.buffer_episodes, seed=args.seed + epoch)
        bar = tqdm(stream, total=train_frames // args.batch_size, desc=f"vae epoch {epoch + 1}/{args.epochs}",
                   unit="batch", dynamic_ncols=True)
        epoch_start, seen, running = time.perf_counter(), 0, []
        for frames in bar:
            losses = train_step(model, optimizer, frames, device, args.precision)
            if not math.isfinite(losses["loss"]):
                raise UserError(f"VAE loss became {losses['loss']} at epoch {epoch + 1}, step {step}; "
                                f"the last good checkpoint is {latest_path}")
            seen, step = seen + len(frames), step + 1
            running.append(losses["loss"])
            img_per_s = seen / (time.perf_counter() - epoch_start)
            if step % 20 == 0:
                for name, value in losses.items():
                    writer.add_scalar(f"train/{name}", value, step)
                writer.add_scalar("perf/img_per_s", img_per_s, step)
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.1f}", img_s=f"{img_per_s:.0f}", refresh=False)
        epoch_seconds = time.perf_counter() - epoch_start
        val = evaluate(model, val_set, device)
        for name, value in val.items():
            writer.add_scalar(f"val/{name}", value, epoch + 1)
        image = reconstruction_png(model, val_set[np.linspace(0, len(val_set) - 1, 8).astype(int)], device)
        for path in (log_dir / f"recon_epoch{epoch + 1:03d}.png", args.ckpt_dir / "vae_recon.png"):
            atomic_write(path, lambda f: iio.imwrite(f, image, extension=".png"))

        metrics = {"train_loss": float(np.mean(running)) if running else math.nan, "img_per_s": seen / epoch_seconds,
                   **{f"val_{name}": value for name, value in val.items()}}
        improved = val["loss"] < best_val
        best_val = min(best_val, val["loss"])
        checkpoint = stage_checkpoint(config, model, args, log_dir, epoch=epoch + 1, metrics=metrics,
                                      best_val_loss=best_val)
        save_stage(best_path, latest_path, checkpoint, {"optimizer": optimizer.state_dict()}, write_out=improved)
        print(f"epoch {epoch + 1}: train loss {metrics['train_loss']:.2f}, val loss {val['loss']:.2f} "
              f"(recon {val['recon']:.2f}, of which the dashboard {val['dashboard']:.2f}; kl {val['kl']:.2f}), "
              f"{metrics['img_per_s']:.0f} img/s, "
              f"{epoch_seconds:.0f}s{'; saved ' + str(best_path) if improved else ''}")
    writer.close()
    print(f"best val loss {best_val:.2f} in {best_path}; reconstructions in {args.ckpt_dir / 'vae_recon.png'}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
