"""Throughput benchmarks for the foundation stages; prints a markdown table (and optionally writes JSON).

Reads:  nothing (it collects its own few episodes into a temporary dir).
Writes: stdout, and --out FILE.json if given.

Rows:
- raw env steps/s: `env.step` with a constant action, one process (gymnasium, envpool);
- raw stepping with 2 envs: gymnasium's AsyncVectorEnv (a pipe round trip per step) vs two
  independent processes of a pool (what collection uses), summed;
- collection steps/s through the real path (`collect_episodes`: policy, preprocessing, compressed
  episode files) with 1 and 2 worker processes, per backend;
- ConvVAE training img/s on uint8 batches already in memory vs streamed from episode files;
- batched dream stepping (env steps/s) and world-model training (sequence steps/s), GRU and MDN-RNN.
Run it on an otherwise idle machine: two cores are easily disturbed.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gymnasium as gym
import numpy as np
import torch

import train_world_model
from conv_vae import ConvVAE, ConvVAEConfig
from dream import BatchedDream
from envs import BACKENDS, ENVPOOL_INSTALL, make_env
from episodes import FrameStream, list_episodes
from rollouts import collect_episodes
from train_vae import train_step
from utils import Precision, autocast, run_main
from world_model import WorldModelConfig, build_world_model

INSTALLED_BACKENDS = tuple(backend for backend in BACKENDS
                           if backend != "envpool" or importlib.util.find_spec("envpool") is not None)


@dataclass
class Args:
    raw_steps: int = 1000
    """steps for each raw env.step measurement"""
    collect_episodes: int = 12
    """episodes per collection measurement (short runs under-state 2 workers: start-up, uneven ends)"""
    collect_max_steps: int = 1000
    vae_batches: int = 40
    """timed VAE training steps per measurement (after 3 warm-up steps)"""
    batch_size: int = 128
    backends: tuple[str, ...] = INSTALLED_BACKENDS
    """env backends to measure (default: those installed; envpool is optional)"""
    dream_envs: int = 1024
    """batch of dreams stepped together"""
    dream_steps: int = 200
    wm_batches: int = 6
    """timed world-model training batches (16 sequences of 1000 steps each)"""
    long_run_episodes: int = 0
    """if > 0: also time this many full episodes with 2 workers on stock vs fast (an evaluation-sized run)"""
    out: Path | None = None
    """also write the figures as JSON here"""


def raw_env_steps_per_s(backend: str, steps: int) -> float:
    env = make_env(backend)
    env.reset(seed=0)
    action = np.array([0.0, 0.5, 0.0], np.float32)
    start = time.perf_counter()
    for _ in range(steps):
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()
    rate = steps / (time.perf_counter() - start)
    env.close()
    return rate


def async_vector_steps_per_s(num_envs: int, steps: int) -> float:
    envs = gym.vector.AsyncVectorEnv([lambda: make_env("gymnasium") for _ in range(num_envs)])
    envs.reset(seed=0)
    envs.action_space.seed(0)
    start = time.perf_counter()
    for _ in range(steps // num_envs):
        envs.step(envs.action_space.sample())
    rate = (steps // num_envs) * num_envs / (time.perf_counter() - start)
    envs.close()
    return rate


def pool_raw_steps_per_s(backend: str, workers: int, steps: int) -> float:
    """Raw env.step rate of `workers` processes stepping independently, summed (each timed after its start-up)."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return sum(pool.starmap(raw_env_steps_per_s, [(backend, steps)] * workers))


def collection_steps_per_s(backend: str, workers: int, episodes: int, max_steps: int, data_dir: Path) -> float:
    start = time.perf_counter()
    summaries = collect_episodes(data_dir, range(episodes), max_steps, workers, backend, progress=False)
    return sum(s["steps"] for s in summaries) / (time.perf_counter() - start)


def vae_img_per_s(batches, model: ConvVAE, count: int, precision: Precision = "fp32") -> float:
    """Training img/s over `count` batches after 3 warm-up ones."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    iterator, cpu = iter(batches), torch.device("cpu")
    for _ in range(3):  # warm-up
        train_step(model, optimizer, next(iterator), cpu, precision)
    images, start = 0, time.perf_counter()
    for _ in range(count):
        batch = next(iterator)
        train_step(model, optimizer, batch, cpu, precision)
        images += len(batch)
    return images / (time.perf_counter() - start)


def cycle(make_iterable):
    """Repeat an iterable without end; an empty one is an error, not a hang."""
    while True:
        empty = True
        for item in make_iterable():
            empty = False
            yield item
        if empty:
            raise ValueError("nothing to iterate over")


def dream_steps_per_s(arch: str, num_envs: int, steps: int, precision: Precision = "fp32") -> float:
    model = build_world_model(WorldModelConfig(arch=arch)).eval()
    dream = BatchedDream(model, torch.zeros(8, 32), torch.zeros(8, 32), num_envs, temperature=1.0, precision=precision)
    dream.reset(torch.arange(num_envs))
    action = torch.rand(num_envs, 3)
    dream.step(action)  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        dream.step(action)
    return num_envs * steps / (time.perf_counter() - start)


def world_model_train_steps_per_s(arch: str, batches: int, precision: Precision = "fp32") -> float:
    """Sequence steps/s of train_world_model's own batch, loss and update, on random latents."""
    model = build_world_model(WorldModelConfig(arch=arch))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_args = train_world_model.Args(arch=arch)
    rng = np.random.default_rng(0)
    episodes = [{"mu": rng.normal(size=(1000, 32)).astype(np.float32), "logvar": np.full((1000, 32), -3, np.float32),
                 "action": rng.random((1000, 3), np.float32), "reward": rng.normal(size=1000).astype(np.float32),
                 "terminated": np.zeros(1000, bool)} for _ in range(16)]
    steps, elapsed = 0, 0.0
    for index in range(batches + 1):
        start = time.perf_counter()
        batch = train_world_model.make_batch(episodes, 1000, rng, "cpu")
        with autocast("cpu", precision):
            _, losses = train_world_model.model_loss(model, batch, train_args)
        optimizer.zero_grad()
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if index:  # the first batch is a warm-up
            elapsed += time.perf_counter() - start
            steps += int(batch["step_mask"].sum())
    return steps / elapsed


def main(args: Args) -> None:
    torch.manual_seed(0)
    rows: list[tuple[str, str, float, str]] = []

    def record(what: str, how: str, value: float, unit: str) -> None:
        rows.append((what, how, value, unit))
        print(f"  {what} [{how}]: {value:.0f} {unit}", flush=True)

    if "envpool" not in INSTALLED_BACKENDS:
        print(f"envpool is not installed: its rows are skipped ({ENVPOOL_INSTALL} to measure it)")
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            record(f"{backend} env.step, constant action", "1 process", raw_env_steps_per_s(backend, args.raw_steps),
                   "steps/s")
        record("gymnasium AsyncVectorEnv, random actions", "2 envs", async_vector_steps_per_s(2, args.raw_steps * 2),
               "steps/s")
        record("gymnasium env.step, constant action", "2 pool processes", pool_raw_steps_per_s("gymnasium", 2,
                                                                                             args.raw_steps), "steps/s")
        for backend in args.backends:
            for workers in (1, 2):
                data_dir = Path(tmp) / f"{backend}-{workers}"
                rate = collection_steps_per_s(backend, workers, args.collect_episodes, args.collect_max_steps, data_dir)
                record(f"{backend} collection (policy, preprocessing, files)", f"{workers} workers", rate, "steps/s")
        for backend in ("gymnasium", "fast")[:2 if args.long_run_episodes else 0]:
            start = time.perf_counter()
            collect_episodes(Path(tmp) / f"long-{backend}", range(1_000_000, 1_000_000 + args.long_run_episodes),
                             1000, 2, backend, progress=False)
            record(f"{backend}: {args.long_run_episodes} full episodes, wall-clock seconds", "2 workers",
                   time.perf_counter() - start, "s")

        model = ConvVAE(ConvVAEConfig())
        rng = np.random.default_rng(0)
        in_memory = [rng.integers(0, 256, (args.batch_size, 64, 64, 3), dtype=np.uint8) for _ in range(8)]
        memory_rate = vae_img_per_s(cycle(lambda: in_memory), model, args.vae_batches)
        record("ConvVAE training, uint8 batches in memory", f"batch {args.batch_size}", memory_rate, "img/s")
        paths = list_episodes(Path(tmp) / f"{args.backends[0]}-2")
        streamed = cycle(lambda: FrameStream(paths, args.batch_size, buffer_episodes=2, drop_last=False))
        stream_rate = vae_img_per_s(streamed, model, args.vae_batches)
        record("ConvVAE training, streamed from episode files", f"batch {args.batch_size}", stream_rate, "img/s")
        for arch in ("gru", "mdn"):
            record(f"dream stepping ({arch}), env steps/s", f"B={args.dream_envs}",
                   dream_steps_per_s(arch, args.dream_envs, args.dream_steps), "steps/s")
            record(f"world model training ({arch}), sequence steps/s", "16 x 1000 steps",
                   world_model_train_steps_per_s(arch, args.wm_batches), "steps/s")

    print(f"\nmachine: {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"gymnasium {gym.__version__}\n")
    print("| what | how | throughput |\n|---|---|---|")
    for what, how, value, unit in rows:
        print(f"| {what} | {how} | {value:.0f} {unit} |")
    print(f"\nstreamed / in-memory VAE training: {stream_rate / memory_rate:.1%}")
    if args.out:
        args.out.write_text(json.dumps([{"what": w, "how": h, "value": v, "unit": u} for w, h, v, u in rows], indent=2))


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
