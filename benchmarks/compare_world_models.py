"""Compare trained world models on the same data: per-head validation figures, side by side.

Reads:  each CKPT_DIR's world_model.pt (and vae.pt: all must share one VAE), DATA_DIR's episodes
        and latent cache (encoding any episode not cached yet).
Writes: a markdown table on stdout.

Rows per model: the held-out split (the same split the stages use) and, since random driving
rarely ends an episode, every episode that terminates (marked in-sample when it was trained on).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_world_model
from agent import load_vae_and_world_model
from episodes import encode_episodes, list_episodes, split_episodes
from utils import UserError, run_main


@dataclass
class Args:
    ckpt_dirs: list[Path] = field(default_factory=lambda: [Path("checkpoints")])
    """checkpoint dirs, each with vae.pt and world_model.pt"""
    data_dir: Path = Path("data")
    val_percent: float = 5.0


def main(args: Args) -> None:
    rows = []
    for ckpt_dir in args.ckpt_dirs:
        vae, model, checkpoint = load_vae_and_world_model(ckpt_dir)
        sha = checkpoint["vae"]["sha256"]
        cache = encode_episodes(vae, sha, list_episodes(args.data_dir), args.data_dir)
        latents = train_world_model.load_latents(cache, sha)
        if not latents:
            raise UserError(f"no episodes in {args.data_dir}")
        train_paths, val_paths = split_episodes(sorted(latents), args.val_percent)
        terminated = [p for p in sorted(latents) if latents[p]["terminated"].any()]
        stage_args = train_world_model.Args(**{k: v for k, v in checkpoint["args"].items()
                                               if k in train_world_model.Args.__dataclass_fields__
                                               and k not in ("data_dir", "ckpt_dir", "log_dir")})
        name = f"{checkpoint['config']['arch']} (overshoot weight {stage_args.reward_overshoot_weight:g})"
        for subset, paths in (("held-out", val_paths), ("terminating episodes", terminated)):
            if not paths:
                continue
            figures = train_world_model.validate(model, [latents[p] for p in paths], stage_args, "cpu")
            in_sample = sum(p in train_paths for p in paths)
            label = f"{subset} ({len(paths)} eps{f', {in_sample} trained on' if in_sample else ''})"
            rows.append((name, label, figures))
    print("| world model | episodes | z NLL/dim | z MSE | reward MAE | reward overshoot | overshoot, no-tile steps "
          "| done precision | done recall |\n|---|---|---|---|---|---|---|---|---|")
    for name, label, f in rows:
        print(f"| {name} | {label} | {f['z_nll']:.3f} | {f['z_mse']:.4f} | {f['reward_mae']:.3f} | "
              f"{f['reward_overshoot']:.3f} | {f['no_tile_overshoot']:.3f} | {f['done_precision']:.2f} | "
              f"{f['done_recall']:.2f} of {f['dones']} |")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
