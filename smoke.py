"""The whole pipeline with the tiny preset, as a user runs it: each stage is its own script in a fresh process.

Reads:  nothing.
Writes: RUN_DIR/data (3 random episodes), RUN_DIR/checkpoints (VAE, world model, the three controllers and
        their evaluation JSONs), RUN_DIR/runs (logs). Prints each stage's wall-clock.

TINY is the one tiny preset: `make smoke` runs it, and the tests take their stages' flags from it.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from utils import UserError, run_main

ROOT = Path(__file__).resolve().parent
TINY = {  # script -> the flags that make it tiny (seconds per stage)
    "collect_data": ["--episodes", "3", "--max-steps", "100"],
    "train_vae": ["--epochs", "1", "--batch-size", "16", "--val-frames", "64"],
    "train_world_model": ["--epochs", "1", "--batch-size", "2", "--hidden-dim", "16", "--num-mixtures", "2"],
    "train_cmaes_in_dream": ["--generations", "2", "--popsize", "4", "--rollouts", "2", "--max-steps", "10",
                             "--eval-every", "0"],
    "train_ppo": ["--total-steps", "64", "--num-envs", "2", "--rollout-steps", "8", "--max-steps", "20",
                  "--hidden-dim", "16", "--minibatches", "2", "--update-epochs", "2", "--eval-every", "0"],
    "train_ppo_in_dream": ["--total-steps", "256", "--num-envs", "8", "--rollout-steps", "8", "--horizon", "8",
                           "--max-steps", "20", "--hidden-dim", "16", "--minibatches", "2", "--update-epochs", "2",
                           "--eval-every", "0"],
    "evaluate": ["--episodes", "2", "--max-steps", "100"],
}


@dataclass
class Args:
    run_dir: Path = Path("/tmp/wm-smoke")
    """where the tiny run's data, checkpoints and logs go"""


def stages(run_dir: Path) -> list[list[str]]:
    """The pipeline's commands in order, each a script with its directories and TINY's flags."""
    data, ckpt, logs = (str(run_dir / name) for name in ("data", "checkpoints", "runs"))
    trained = ["--ckpt-dir", ckpt, "--log-dir", logs]
    return [["collect_data.py", "--data-dir", data, *TINY["collect_data"]],
            ["train_vae.py", "--data-dir", data, *trained, *TINY["train_vae"]],
            ["train_world_model.py", "--data-dir", data, *trained, *TINY["train_world_model"]],
            ["train_cmaes_in_dream.py", "--data-dir", data, *trained, *TINY["train_cmaes_in_dream"]],
            ["train_ppo.py", *trained, *TINY["train_ppo"]],
            ["train_ppo_in_dream.py", "--data-dir", data, *trained, *TINY["train_ppo_in_dream"]],
            *(["evaluate.py", "--ckpt-dir", ckpt, "--controller", name, *TINY["evaluate"]]
              for name in ("cmaes", "ppo", "ppo_dream"))]


def label(command: list[str]) -> str:
    """A stage's name in tables: its script, and which policy collects or which controller plays."""
    script = command[0]
    if script == "collect_data.py":
        return f"{script} {command[command.index('--policy') + 1] if '--policy' in command else 'random'}"
    return script + (f" {command[command.index('--controller') + 1]}" if "--controller" in command else "")


def main(args: Args) -> None:
    for command in stages(args.run_dir):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *command], cwd=ROOT)
        if result.returncode != 0:
            raise UserError(f"{' '.join(command)} failed (exit {result.returncode})")
        print(f"smoke: {label(command)} {time.perf_counter() - start:.1f} s", flush=True)
    print(f"smoke: every stage ran; files in {args.run_dir}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
