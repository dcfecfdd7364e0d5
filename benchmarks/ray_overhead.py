"""Ray overhead: the same collection on the process pool and on a Ray cluster of this machine, side by side.

Reads:  nothing (it collects its own episodes into a temporary dir).
Writes: stdout (a markdown table), and --out FILE.json if given.

Both backends collect the same EPISODES random episodes of MAX_STEPS frames with WORKERS processes / CPUs,
alternately (pool, Ray, pool, Ray, ...) so that drift on a shared machine hits both alike. The pool's
times include spawning its workers, as every collection does; Ray's include shipping the work to a head
started once (`ray start --head` on this machine, here through ray.cluster_utils), the time a user with a
running cluster sees; the head's start-up and the first connection are reported on their own line. The
episode files of both must be identical (checked). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import cluster
from episodes import EPISODE_KEYS, list_episodes, load_episode
from rollouts import collect_episodes
from utils import UserError, run_main


@dataclass
class Args:
    episodes: int = 12
    """episodes per timed collection"""
    max_steps: int = 1000
    """frames per episode"""
    workers: int = 2
    """pool worker processes, and CPUs of the Ray head"""
    repeats: int = 2
    """timed collections per backend (alternating)"""
    out: Path | None = None
    """also write the figures as JSON here"""


def timed_collection(data_dir: Path, args: Args, ray_address: str | None) -> float:
    """Frames per second of one collection of args.episodes new episodes."""
    start = time.perf_counter()
    summaries = collect_episodes(data_dir, range(args.episodes), args.max_steps, args.workers, progress=False,
                                 ray_address=ray_address)
    return sum(s["frames"] for s in summaries) / (time.perf_counter() - start)


def main(args: Args) -> None:
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        raise UserError("the Ray overhead benchmark needs Ray: pip install -r requirements-cluster.txt") from None
    start = time.perf_counter()
    head = Cluster(initialize_head=True, head_node_args={"num_cpus": args.workers, "include_dashboard": False})
    rates: dict[str, list[float]] = {"pool": [], "ray": []}
    try:
        cluster.connect(head.address)
        startup = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            for repeat in range(args.repeats):
                for name, address in (("pool", None), ("ray", head.address)):
                    rate = timed_collection(Path(tmp) / f"{name}-{repeat}", args, address)
                    rates[name].append(rate)
                    print(f"  {name} collection {repeat + 1}: {rate:.0f} frames/s", flush=True)
            keys = (*EPISODE_KEYS, "action_repeat")
            pool_paths, ray_paths = list_episodes(Path(tmp) / "pool-0"), list_episodes(Path(tmp) / "ray-0")
            if [p.name for p in pool_paths] != [p.name for p in ray_paths] or len(pool_paths) != args.episodes:
                raise SystemExit("Ray and the pool wrote different sets of episode files")
            for pool_path, ray_path in zip(pool_paths, ray_paths):
                pool_episode, ray_episode = load_episode(pool_path, keys), load_episode(ray_path, keys)
                if not all(np.array_equal(pool_episode[key], ray_episode[key]) for key in keys):
                    raise SystemExit(f"the Ray episode {ray_path.name} differs from the pool's")
    finally:
        cluster.disconnect()
        head.shutdown()
    pool, ray = float(np.mean(rates["pool"])), float(np.mean(rates["ray"]))
    print(f"\n{args.episodes} episodes of {args.max_steps} frames, {args.workers} workers / CPUs, mean of "
          f"{args.repeats} alternating runs; identical episode files\n")
    print("| backend | collection | overhead |\n|---|---|---|")
    print(f"| process pool | {pool:.0f} frames/s | - |")
    print(f"| Ray, one node on this machine | {ray:.0f} frames/s | {pool / ray - 1:+.1%} time per frame |")
    print(f"| Ray head start-up and first connection | {startup:.1f} s | once per cluster / process |")
    if args.out:
        args.out.write_text(json.dumps({"pool_frames_per_s": rates["pool"], "ray_frames_per_s": rates["ray"],
                                        "startup_s": startup, "episodes": args.episodes,
                                        "max_steps": args.max_steps, "workers": args.workers}, indent=2))


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
