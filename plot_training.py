"""Plot the curves of training runs to PNG, from their TensorBoard logs.

Reads:  LOG_DIR/<stage>-<time>/events.* (every stage writes them: vae, world_model, cmaes, ppo, ppo_dream).
Writes: OUT_DIR/<run>.png, one figure per run: a panel per logged curve (VAE and world-model losses per
        head, train and validation; PPO losses, KL, steps/s), with the returns of a run drawn together in
        the first panel (CMA-ES dream fitness best and mean beside its real checks; PPO training-episode
        returns beside the real and dream scores of its checks: the dream-to-real gap).

    python plot_training.py                      # every run under runs/
    python plot_training.py --runs ppo_dream cmaes --out-dir docs
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import UserError, atomic_write, run_main

RETURN_TAGS = ("cmaes/fitness_best", "cmaes/fitness_mean", "real/mean_return", "real/episode_return",
               "dream/episode_return", "eval/real_return", "eval/dream_return")
X_LABELS = {"train": "step", "val": "epoch", "perf": "step", "cmaes": "generation", "real": "generation / env step",
            "ppo": "env step", "eval": "env step", "dream": "env step"}


@dataclass
class Args:
    log_dir: Path = Path("runs")
    """the TensorBoard runs to plot (LOG_DIR/<stage>-<time>/)"""
    runs: list[str] = field(default_factory=list)
    """run dirs or stage prefixes to plot (default: every run under LOG_DIR)"""
    out_dir: Path | None = None
    """where the PNGs go (default: LOG_DIR/plots)"""
    smooth: int = 20
    """moving-average window for per-episode and per-step curves (1: raw)"""


def read_scalars(run_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{tag: (steps, values)} of every scalar in a run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: (np.array([e.step for e in events.Scalars(tag)]), np.array([e.value for e in events.Scalars(tag)]))
            for tag in events.Tags()["scalars"]}


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < 2 * window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window - 1, 0), mode="edge"), kernel, mode="valid")


def plot_run(run_dir: Path, out: Path, smooth: int) -> int:
    """One PNG per run; returns the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = read_scalars(run_dir)
    returns = [tag for tag in RETURN_TAGS if tag in scalars]
    others = sorted(tag for tag in scalars if tag not in returns)
    panels = ([returns] if returns else []) + [[tag] for tag in others]
    if not panels:
        return 0
    columns = min(4, len(panels))
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for axis, tags in zip(axes.flat, panels):
        for tag in tags:
            steps, values = scalars[tag]
            many = tag.endswith("episode_return") or tag.startswith(("train/", "perf/"))
            marker = "o" if len(values) < 30 and not many else None
            axis.plot(steps, smoothed(values, smooth) if many else values, marker=marker, markersize=3, label=tag)
        axis.set_title("returns" if len(tags) > 1 or tags[0] in RETURN_TAGS else tags[0], fontsize=10)
        axis.set_xlabel(X_LABELS.get(tags[0].split("/")[0], "step"), fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if len(tags) > 1 or tags[0] in RETURN_TAGS:
            axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(run_dir.name)
    figure.tight_layout()
    atomic_write(out, lambda f: figure.savefig(f, format="png", dpi=90))
    plt.close(figure)
    return len(panels)


def main(args: Args) -> None:
    if not args.log_dir.is_dir():
        raise UserError(f"log dir {args.log_dir} not found: train a stage first (logs go to runs/ by default)")
    runs = sorted(path for path in args.log_dir.iterdir() if path.is_dir() and any(path.glob("events.*")))
    if args.runs:
        runs = [run for run in runs if any(run.name == name or run.name.rsplit("-", 2)[0] == name
                                           for name in args.runs)]
    if not runs:
        raise UserError(f"no run logs{' matching ' + ', '.join(args.runs) if args.runs else ''} under {args.log_dir}")
    out_dir = args.out_dir or args.log_dir / "plots"
    for run in runs:
        panels = plot_run(run, out_dir / f"{run.name}.png", args.smooth)
        print(f"{run.name}: {panels} panels -> {out_dir / (run.name + '.png')}" if panels
              else f"{run.name}: no scalars")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
