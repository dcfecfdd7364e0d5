"""fp32 against bf16 mixed precision (utils.autocast) for every network that trains or dreams; a markdown table.

Reads:  DATA_DIR's episodes when given (the VAE then trains on real frames streamed from them), else nothing.
Writes: stdout, and --out FILE.json if given.

Rows, each timed in fp32 and in bf16 one after the other: ConvVAE training (img/s), MDN-RNN training (sequence
steps/s), MDN-RNN dream stepping at B = 1024 (env steps/s), and PPO's update on a dream rollout (1024 dreams x 16
decisions, 4 epochs of 16 minibatches: train_ppo_in_dream.py's) and on a real one (8 envs x 128 decisions, 10 epochs
of 8: train_ppo.py's), in updates/s. Run it on an otherwise idle machine: two cores are easily disturbed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from bench import cycle, dream_steps_per_s, vae_img_per_s, world_model_train_steps_per_s

from actor_critic import ActorCritic, ControllerConfig
from conv_vae import ConvVAE, ConvVAEConfig
from episodes import FrameStream, list_episodes
from utils import Precision, UserError, autocast, run_main
from utils_rl import ppo_update

PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")


@dataclass
class Args:
    data_dir: Path | None = None
    """train the VAE on frames streamed from DATA_DIR/rollouts/*/ (default: random frames in memory)"""
    vae_batches: int = 40
    """timed VAE training steps per measurement (after 3 warm-up steps)"""
    wm_batches: int = 6
    """timed world-model training batches (16 sequences of 1000 steps each)"""
    dream_steps: int = 200
    """timed dream steps of 1024 dreams"""
    ppo_updates: int = 2
    """timed PPO updates per shape"""
    out: Path | None = None
    """also write the figures as JSON here"""


def ppo_updates_per_s(decisions: int, epochs: int, minibatches: int, updates: int, precision: Precision) -> float:
    """PPO updates/s of utils_rl.ppo_update on random [z, h] observations, the shipped actor-critic's sizes."""
    model = ActorCritic(ControllerConfig(kind="actor_critic", obs_dim=288, hidden_dim=256, action_repeat=4))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, eps=1e-5)
    obs = torch.randn(decisions, 288)
    with torch.no_grad():
        dist = model.policy(obs)
        sample = dist.sample()
        batch = {"obs": obs, "sample": sample, "log_prob": dist.log_prob(sample),
                 "advantage": torch.randn(decisions), "value_target": torch.randn(decisions)}
    start = time.perf_counter()
    for _ in range(updates):
        with autocast("cpu", precision):
            ppo_update(model, optimizer, batch, epochs, minibatches, 0.2, 0.0, 0.5, 0.5)
    return updates / (time.perf_counter() - start)


def main(args: Args) -> None:
    torch.manual_seed(0)
    if args.data_dir is not None:
        paths = list_episodes(args.data_dir)
        if not paths:
            raise UserError(f"no episodes in {args.data_dir}/rollouts/")
        frames, where = (lambda: FrameStream(paths, 128, buffer_episodes=8, drop_last=True)), "real frames, streamed"
    else:
        rng = np.random.default_rng(0)
        in_memory = [rng.integers(0, 256, (128, 64, 64, 3), dtype=np.uint8) for _ in range(8)]
        frames, where = (lambda: in_memory), "random frames in memory"
    measures = {
        f"ConvVAE training ({where}, batch 128), img/s":
            lambda p: vae_img_per_s(cycle(frames), ConvVAE(ConvVAEConfig(dashboard_weight=4.0)), args.vae_batches, p),
        "MDN-RNN training (16 x 1000 decisions), sequence steps/s":
            lambda p: world_model_train_steps_per_s("mdn", args.wm_batches, p),
        "MDN-RNN dream stepping (B = 1024), env steps/s": lambda p: dream_steps_per_s("mdn", 1024, args.dream_steps, p),
        "PPO update, dream rollout (16,384 decisions, 4 x 16 minibatches), updates/s":
            lambda p: ppo_updates_per_s(16384, 4, 16, args.ppo_updates, p),
        "PPO update, real rollout (1,024 decisions, 10 x 8 minibatches), updates/s":
            lambda p: ppo_updates_per_s(1024, 10, 8, 4 * args.ppo_updates, p),
    }
    rows = []
    for what, measure in measures.items():
        rates = {precision: measure(precision) for precision in PRECISIONS}
        rows.append({"what": what, **rates})
        print(f"  {what}: " + ", ".join(f"{p} {rate:,.1f}" for p, rate in rates.items()), flush=True)
    print(f"\n{torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    print("| what | fp32 | bf16 | bf16 / fp32 |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['what']} | {row['fp32']:,.1f} | {row['bf16']:,.1f} | {row['bf16'] / row['fp32']:.2f}x |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
