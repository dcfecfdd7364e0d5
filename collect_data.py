"""Collect CarRacing episodes to disk, one compressed .npz per episode.

Reads:  nothing (the `random` policy), or CKPT_DIR's agent (vae.pt, world_model.pt and
        controller_<CONTROLLER>.pt) for `--policy agent`.
Writes: DATA_DIR/rollouts/<policy>/ep_<track seed>.npz (the episode contract of episodes.py): one step per
        decision, each decision's action held for ACTION_REPEAT frames (the random policy; an agent
        uses its own world model's rate), the file's `action_repeat` saying how many.

Track seeds are SEED, SEED+1, ..., SEED+EPISODES-1, so re-running the same command skips the
episodes already on disk and collects only the missing ones; a killed run leaves no half file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from agent import ControllerName
from episodes import list_episodes
from rollouts import collect_episodes
from utils import UserError, pick_device, run_main


@dataclass
class Args:
    data_dir: Path = Path("data")
    """where episodes go (under DATA_DIR/rollouts/<policy>/)"""
    episodes: int = 800
    """how many episodes (track seeds SEED .. SEED+EPISODES-1)"""
    max_steps: int = 1000
    """steps per episode at most (CarRacing's own limit is 1000)"""
    workers: int = 2
    """parallel worker processes"""
    seed: int = 0
    """first track seed; keep collection seeds apart from evaluation seeds (evaluate.py starts at 1000000)"""
    policy: Literal["random", "agent"] = "random"
    """random: smooth Brownian driving that follows and leaves the road; agent: a trained agent plus noise"""
    ckpt_dir: Path = Path("checkpoints")
    """the agent, for --policy agent"""
    controller: ControllerName = "cmaes"
    """which controller of CKPT_DIR drives, for --policy agent"""
    noise: float = 0.1
    """std of the Gaussian exploration noise on the agent's actions, for --policy agent"""
    action_repeat: int = 4
    """frames each random decision is held for (the world model's clock); --policy agent uses the agent's"""
    env_backend: str = "fast"
    """fast (pixel-exact CarRacing-v3, faster), gymnasium (stock) or envpool (approximate clone)"""
    ray_address: str | None = None
    """play the episodes on this Ray cluster (auto, or the head's HOST:PORT; pip install -r
    requirements-cluster.txt) instead of --workers local processes; the files are written here as they come back"""
    device: str = "cpu"
    """where the agent's networks run (--policy agent): cpu (the reported scores), auto, cuda or cuda:N"""


def main(args: Args) -> None:
    if args.episodes < 1 or args.max_steps < 1 or args.workers < 1 or args.action_repeat < 1:
        raise UserError("--episodes, --max-steps, --workers and --action-repeat must be at least 1")
    device = str(pick_device(args.device))
    start = time.perf_counter()
    seeds = range(args.seed, args.seed + args.episodes)
    policy_kwargs = ({"ckpt_dir": str(args.ckpt_dir), "controller": args.controller, "noise": args.noise,
                      "device": device}
                     if args.policy == "agent" else {"action_repeat": args.action_repeat})
    summaries = collect_episodes(args.data_dir, seeds, args.max_steps, args.workers, args.env_backend, args.policy,
                                 policy_kwargs, ray_address=args.ray_address)
    elapsed = time.perf_counter() - start
    total = len(list_episodes(args.data_dir, [args.policy]))
    if not summaries:
        print(f"all {args.episodes} episodes already in {args.data_dir}/rollouts/{args.policy} ({total} there)")
        return
    steps, frames = sum(s["steps"] for s in summaries), sum(s["frames"] for s in summaries)
    returns = [s["return"] for s in summaries]
    print(f"collected {len(summaries)} episodes, {steps} decisions ({frames} frames) in {elapsed:.1f}s "
          f"({frames / elapsed:.0f} frames/s), "
          f"return {np.mean(returns):.1f} ± {np.std(returns):.1f}; {total} episodes in "
          f"{args.data_dir}/rollouts/{args.policy}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
