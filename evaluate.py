"""Evaluate an agent on CarRacing-v3: N episodes on track seeds S..S+N-1, deterministic actions (or, with
--noise, Gaussian noise on them, seeded per track).

Reads:  CKPT_DIR (default pretrained/)/vae.pt, world_model.pt and controller_<CONTROLLER>.pt (checked to belong
        together; an ensemble's members too, make_ensemble.py).
Writes: a JSON summary (contract): env_id, episodes, seed, mean, std, min, max, returns (in seed
        order), plus the controller, checkpoint dir, backend, wall-clock and identity; to --out, or to
        CKPT_DIR/eval_<CONTROLLER>.json by default. While it runs, OUT with the suffix .partial.json holds the
        finished tracks: a killed evaluation re-run with the same agent and settings plays only the rest
        (wall_seconds then counts the last run only). When OUT already holds this very evaluation (the same
        settings, agent files and code: its `identity`), a re-run prints its score and plays nothing (--again
        plays it anew).

Episodes run in parallel worker processes on the `fast` env, which is pixel-identical to stock
CarRacing-v3 (`--env-backend gymnasium` plays the stock one). The same seed gives the same returns.
Default seeds start at 1,000,000, far from every collection seed, so they are unseen tracks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from agent import ControllerName, agent_dir_and_controller, load_agent
from rollouts import evaluate_agent, evaluation_identity
from utils import UserError, atomic_write, pick_device, run_main


@dataclass
class Args:
    ckpt_dir: Path | None = None
    """the agent: vae.pt, world_model.pt and controller_<CONTROLLER>.pt (default: pretrained/, the shipped one)"""
    controller: ControllerName | None = None
    """which controller of CKPT_DIR (default: the first of ensemble, ppo, ppo_dream, cmaes it holds)"""
    episodes: int = 100
    """tracks played, seeds SEED .. SEED + EPISODES - 1"""
    seed: int = 1_000_000
    """first track seed; episode i plays track SEED + i"""
    workers: int = 2
    """parallel worker processes"""
    max_steps: int = 1000
    """episode length in frames"""
    env_backend: Literal["fast", "gymnasium"] = "fast"
    """fast: pixel-identical to stock CarRacing-v3 and faster; gymnasium: the stock env"""
    out: Path | None = None
    """JSON path (default CKPT_DIR/eval_<CONTROLLER>.json)"""
    noise: float = 0.0
    """std of Gaussian noise on the agent's actions, seeded per track (0: deterministic play, the reported scores)"""
    ray_address: str | None = None
    """play the episodes on this Ray cluster (auto, or the head's HOST:PORT; pip install -r
    requirements-cluster.txt) instead of --workers local processes; the JSON is written here"""
    device: str = "cpu"
    """where the agent's networks run: cpu (the reported scores), auto, cuda or cuda:N"""
    again: bool = False
    """play the tracks even when OUT already holds this evaluation (the same settings, agent files and code)"""


def stored_evaluation(out: Path, identity: dict) -> dict | None:
    """OUT's evaluation if it is the one of IDENTITY (rollouts.evaluation_identity), complete; else None."""
    try:
        stored = json.loads(out.read_bytes())
        complete = isinstance(stored["returns"], list) and len(stored["returns"]) == identity["episodes"]
        return stored if stored.get("identity") == identity and complete else None
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or not a record of an evaluation: play it
        return None


def main(args: Args) -> None:
    if args.episodes < 1 or args.workers < 1 or args.max_steps < 1 or args.noise < 0:
        raise UserError("--episodes, --workers and --max-steps must be at least 1, --noise at least 0")
    device = str(pick_device(args.device))
    args.ckpt_dir, args.controller = agent_dir_and_controller(args.ckpt_dir, args.controller)
    out = args.out or args.ckpt_dir / f"eval_{args.controller}.json"
    load_agent(args.ckpt_dir, args.controller)  # (a clear error for a damaged or mismatched agent, before hashing it)
    identity = evaluation_identity(args.ckpt_dir, args.controller, args.episodes, args.seed, args.max_steps,
                                   args.env_backend, args.noise, device)
    result = None if args.again else stored_evaluation(out, identity)
    if result is None:
        result = evaluate_agent(args.ckpt_dir, args.controller, args.episodes, args.seed, args.workers,
                                args.max_steps, args.env_backend, noise=args.noise,
                                progress_file=out.with_suffix(".partial.json"), ray_address=args.ray_address,
                                device=device)
        atomic_write(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
        done = f"{result['wall_seconds']:.0f}s; written to {out}"
    else:
        done = f"already in {out} (the same settings, agent files and code; --again plays it anew)"
    print(f"{args.controller}: {result['mean']:.1f} ± {result['std']:.1f} over {args.episodes} tracks "
          f"(seeds {args.seed}..{args.seed + args.episodes - 1}, min {result['min']:.1f}, max {result['max']:.1f}), "
          f"{done}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
