"""Where a CarRacing step goes: cProfile of N steps of a backend, the top functions by own time.

Reads: nothing. Writes: a table on stdout (ms per step and share of the step for each function).
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs import make_env
from rollouts import BrownianPolicy, drive
from utils import run_main


@dataclass
class Args:
    backend: str = "fast"
    steps: int = 600
    seed: int = 2
    top: int = 15
    """functions listed"""

def main(args: Args) -> None:
    env = make_env(args.backend)
    # actions first, so the profile holds only env.step
    actions = [step.action for step in drive(env, BrownianPolicy(action_repeat=1), args.seed, args.steps)]
    env.reset(seed=args.seed)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for action in actions:
        env.step(action)
    profiler.disable()
    per_step_ms = (time.perf_counter() - start) / len(actions) * 1000
    stats = pstats.Stats(profiler).stats
    rows = sorted(((own, calls, f"{Path(file).name}:{line}({name})") for (file, line, name), (_, calls, own, _, _)
                   in stats.items()), reverse=True)[:args.top]
    total_own = sum(own for _, _, own, _, _ in stats.values())
    print(f"{args.backend}: {len(actions)} steps, {per_step_ms:.2f} ms/step under the profiler "
          f"({1000 / per_step_ms:.0f} steps/s)\n")
    print("| function | calls/step | ms/step | share |\n|---|---|---|---|")
    for own, calls, where in rows:
        print(f"| {where} | {calls / len(actions):.1f} | {own / len(actions) * 1000:.3f} | {own / total_own:.1%} |")

if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
