"""Do envpool's frames look like gymnasium's to the VAE? A controlled comparison.

Collects the same number of episodes (track seeds 0..N-1, the same collection policy) with each
backend, trains one ConvVAE on each with identical settings, and scores both on held-out frames of
the reference gymnasium env (track seeds from --eval-seed, never used for training). If the
envpool-trained VAE reconstructs gymnasium frames about as well as the gymnasium-trained one, the
faster backend can serve collection for V.

Reads:  nothing.
Writes: WORK_DIR/{gymnasium,envpool,eval}/ episodes, WORK_DIR/ckpt-<backend>/vae.pt, a table on stdout.
Re-running reuses the episodes and checkpoints already there (each stage resumes).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import train_vae
from agent import load_vae
from episodes import list_episodes
from rollouts import collect_episodes
from utils import run_main


@dataclass
class Args:
    work_dir: Path = Path.home() / "wm" / "backend_transfer"
    episodes: int = 30
    """training episodes per backend"""
    eval_episodes: int = 8
    eval_seed: int = 2_000_000
    """first gymnasium track seed of the held-out evaluation episodes"""
    epochs: int = 2
    max_steps: int = 1000
    workers: int = 2


def main(args: Args) -> None:
    timings = {}
    for backend in ("gymnasium", "envpool"):
        start = time.perf_counter()
        collect_episodes(args.work_dir / backend, range(args.episodes), args.max_steps, args.workers, backend)
        timings[backend] = time.perf_counter() - start
    collect_episodes(args.work_dir / "eval", range(args.eval_seed, args.eval_seed + args.eval_episodes),
                     args.max_steps, args.workers, "gymnasium")
    eval_frames = train_vae.validation_frames(list_episodes(args.work_dir / "eval"), 4096)

    results = {}
    for backend in ("gymnasium", "envpool"):
        ckpt_dir = args.work_dir / f"ckpt-{backend}"
        train_vae.main(train_vae.Args(data_dir=args.work_dir / backend, ckpt_dir=ckpt_dir, epochs=args.epochs,
                                      log_dir=args.work_dir / "runs", collect=False, device="cpu"))
        model, _ = load_vae(ckpt_dir / "vae.pt")
        results[backend] = train_vae.evaluate(model, eval_frames, "cpu")

    print(f"\nVAE trained on {args.episodes} episodes x {args.epochs} epochs per backend; scored on "
          f"{len(eval_frames)} frames of {args.eval_episodes} held-out gymnasium episodes (decoding mu)\n")
    print("| VAE trained on | recon loss on gymnasium frames | KL | total |\n|---|---|---|---|")
    for backend, figures in results.items():
        print(f"| {backend} | {figures['recon']:.1f} | {figures['kl']:.1f} | {figures['loss']:.1f} |")
    gap = results["envpool"]["recon"] / results["gymnasium"]["recon"] - 1
    print(f"\nenvpool-trained recon loss is {gap:+.1%} relative to gymnasium-trained "
          f"(per-pixel RMSE {np.sqrt(results['envpool']['recon'] / 12288) * 255:.1f} vs "
          f"{np.sqrt(results['gymnasium']['recon'] / 12288) * 255:.1f} levels)")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
