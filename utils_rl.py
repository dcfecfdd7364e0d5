"""Environments, collection policies, parallel episode collection, and the dream.

`make_env` is the one place an environment is built. Collection runs whole episodes in worker
processes (a process pool, not a vector env: each worker steps, preprocesses and writes its own
episode files, so no frame crosses a pipe per step; see the benchmark table in the README).
The dream (`BatchedDream`, `DreamEnv`) runs CarRacing inside a trained world model.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
import time
from pathlib import Path
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

from fast_car_racing import make_fast_env
from utils import (UserError, episode_dir, episode_path, is_complete_npz, list_episodes, load_agent,
                   load_vae_and_world_model, preprocess_frame, save_episode)

ENV_ID = "CarRacing-v3"
BACKENDS = ("fast", "gymnasium", "envpool")
ENVPOOL_INSTALL = "pip install envpool==1.2.5"
ACTION_LOW, ACTION_HIGH = np.array([-1.0, 0.0, 0.0], np.float32), np.ones(3, np.float32)  # CarRacing's action box


# ----------------------------------------------------------------------------- environments


class EnvPoolCarRacing(gym.Env):
    """EnvPool's C++ CarRacing-v3 behind the single-env Gymnasium API.

    An approximate clone of the reference env (other tracks for the same seed, pixels a few levels
    off): for collection only, never for a reported score. EnvPool fixes the track seed when the
    pool is made, so `reset(seed=s)` makes a fresh one-env pool (about 3 ms).
    """

    metadata = {"render_modes": []}

    def __init__(self, max_episode_steps: int = 1000):
        import envpool

        self._envpool = envpool
        self.max_episode_steps = max_episode_steps
        self.observation_space = gym.spaces.Box(0, 255, (96, 96, 3), np.uint8)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self._pool = None
        self._next_seed = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self._next_seed = seed
        self._pool = self._envpool.make_gymnasium(
            "CarRacing-v3", num_envs=1, seed=self._next_seed, max_episode_steps=self.max_episode_steps)
        self._next_seed += 1
        obs, _ = self._pool.reset()
        return obs[0], {}

    def step(self, action):
        obs, reward, terminated, truncated, _ = self._pool.step(np.asarray(action, np.float32)[None])
        return obs[0], float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}


def make_env(backend: str = "fast", max_steps: int = 1000, render_mode: str | None = None) -> gym.Env:
    """The environment for `backend`:
    - `fast` (default): a subclass of gymnasium's CarRacing-v3 with identical observations, rewards and
      flags, ~2.5x faster (fast_car_racing.py); stock, with a warning, on unverified versions;
    - `gymnasium`: the stock reference CarRacing-v3;
    - `envpool`: a faster approximate clone (other tracks, slightly other pixels), for collection only."""
    if backend == "fast":
        return make_fast_env(max_episode_steps=max_steps, render_mode=render_mode)
    if backend == "gymnasium":
        return gym.make(ENV_ID, max_episode_steps=max_steps, render_mode=render_mode)
    if backend == "envpool":
        try:
            import envpool  # noqa: F401
        except ImportError:
            raise UserError(f"env backend 'envpool' is not installed: {ENVPOOL_INSTALL} (or use --env-backend fast)")
        if render_mode is not None:
            raise UserError("the envpool backend cannot render a window; use --env-backend fast")
        return EnvPoolCarRacing(max_episode_steps=max_steps)
    raise UserError(f"unknown env backend {backend!r}: choose one of {', '.join(BACKENDS)}")


# ----------------------------------------------------------------------------- collection policies


def road_offset(frame: np.ndarray) -> float | None:
    """Where the road lies ahead of the car in a preprocessed 64x64 frame: -1 (left) .. 1 (right), None if unseen.

    Road pixels are the grey ones (channels equal within a few levels, 80..130); the band looked at is
    the stretch of screen in front of the car (rows 24-42; the car sits near row 46, column 32).
    """
    band = frame[24:43].astype(np.int16)
    grey = (band.max(axis=2) - band.min(axis=2) < 12) & (band[..., 0] > 80) & (band[..., 0] < 130)
    columns = np.nonzero(grey)[1]
    if len(columns) < 8:
        return None
    return float(np.clip((columns.mean() - 31.5) / 16.0, -1.0, 1.0))


class BrownianPolicy:
    """Smooth random driving that goes along the road and off it: Ornstein-Uhlenbeck noise on steering,
    gas and brake, plus a pull toward the road seen in the frame whose strength itself drifts.

    Pure OU noise (uniform noise only jitters in place) leaves the road within ~50 steps and then
    spends 95% of an episode on grass. Here a slowly wandering `focus` (mean reversion over ~100
    steps) weighs a steer toward the grey pixels ahead: while it is high the car follows the road,
    taking curves at random speeds; while it is low the noise takes it onto the grass, and the pull
    brings it back when the road is still in view. Only the frame is used (no simulator state), so the
    policy works with every backend. Each episode's noise is seeded by its track seed.
    """

    def __init__(self, **_unused):
        self.rng = np.random.default_rng(0)
        # noise state and its OU parameters, per (steer, gas, brake, focus)
        self.mean = np.array([0.0, 0.35, -0.3, 0.9])
        self.pull = np.array([0.10, 0.05, 0.10, 0.01])
        self.noise = np.array([0.12, 0.08, 0.10, 0.07])
        self.state = self.mean.copy()

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng([seed, 1])
        self.state = self.mean.copy()

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        self.state += self.pull * (self.mean - self.state) + self.noise * self.rng.standard_normal(4)
        self.state = np.clip(self.state, -1.5, 1.5)
        steer_noise, gas, brake, focus = self.state
        road = road_offset(frame)
        steer = steer_noise + (np.clip(focus, 0.0, 1.0) * 2.0 * road if road is not None else 0.0)
        return np.clip([steer, gas, brake], [-1.0, 0.0, 0.0], [1.0, 1.0, 1.0]).astype(np.float32)


class AgentPolicy:
    """A trained agent (VAE + world model + controller from a checkpoint dir) as a collection policy,
    with optional Gaussian exploration noise on its actions (seeded per episode); noise 0 is the
    deterministic agent that evaluation plays."""

    def __init__(self, ckpt_dir: str = "checkpoints", controller: str = "cmaes", noise: float = 0.0, **_unused):
        self.agent = load_agent(Path(ckpt_dir), controller)
        self.noise = noise
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.agent.reset(seed)
        self.rng = np.random.default_rng([seed, 2])

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        action = self.agent(frame)
        if self.noise > 0:
            action = np.clip(action + self.noise * self.rng.standard_normal(3), ACTION_LOW, ACTION_HIGH)
        return action.astype(np.float32)


POLICIES = {"random": BrownianPolicy, "agent": AgentPolicy}


def make_policy(name: str, **kwargs):
    if name not in POLICIES:
        raise UserError(f"unknown collection policy {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)


# ----------------------------------------------------------------------------- rollouts


def rollout_episode(env: gym.Env, policy, track_seed: int, max_steps: int, on_step=None) -> dict:
    """Play one episode; obs[t] is the preprocessed frame the action[t] was chosen on, reward[t] what it earned."""
    frame, _ = env.reset(seed=track_seed)
    policy.reset(track_seed)
    obs, actions, rewards, terminated, truncated = [], [], [], [], []
    for step in range(max_steps):
        small = preprocess_frame(frame)
        action = policy(small)
        frame, reward, term, trunc, _ = env.step(action)
        trunc = trunc or (step == max_steps - 1 and not term)
        obs.append(small), actions.append(action), rewards.append(reward)
        terminated.append(term), truncated.append(trunc)
        if on_step is not None:
            on_step()
        if term or trunc:
            break
    return {"obs": np.stack(obs), "action": np.stack(actions), "reward": np.array(rewards, np.float32),
            "terminated": np.array(terminated), "truncated": np.array(truncated), "seed": track_seed}


_worker: dict = {}  # per worker process: its env, policy and settings, built once by _setup_worker


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when its parent dies, instead of it finishing an episode
    and then failing on the closed result pipe (a killed run then leaves no stray process)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _init_worker(*setup_args) -> None:
    """Initializer of a pool worker process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    _die_with_parent()
    torch.set_num_threads(1)  # one process per core already; more threads would fight over the cores
    _setup_worker(*setup_args)


def _setup_worker(backend: str, max_steps: int, policy_name: str, policy_kwargs: dict, step_counter) -> None:
    _worker.update(env=make_env(backend, max_steps), policy=make_policy(policy_name, **policy_kwargs),
                   max_steps=max_steps, counter=step_counter, pending=0)


def _count_step() -> None:
    _worker["pending"] += 1
    if _worker["pending"] == 50:  # batch the shared-counter updates: a lock per step is measurable
        with _worker["counter"].get_lock():
            _worker["counter"].value += 50
        _worker["pending"] = 0


def _play_one(task: tuple[int, str | None]) -> dict:
    track_seed, path = task
    episode = rollout_episode(_worker["env"], _worker["policy"], track_seed, _worker["max_steps"], _count_step)
    if path is not None:
        save_episode(Path(path), episode)
    with _worker["counter"].get_lock():
        _worker["counter"].value += _worker["pending"]
    _worker["pending"] = 0
    return {"seed": track_seed, "steps": len(episode["reward"]), "return": float(episode["reward"].sum())}


def collect_episodes(data_dir: Path, track_seeds: Sequence[int], max_steps: int = 1000, workers: int = 2,
                     backend: str = "fast", policy: str = "random", policy_kwargs: dict | None = None,
                     source: str | None = None, progress: bool = True) -> list[dict]:
    """Collect one episode file per track seed into data_dir/rollouts/<source>/, skipping complete ones.

    Returns a summary (seed, steps, return) of each episode collected now. Safe to kill at any
    moment: files appear only when complete, and a re-run collects just the missing seeds.
    """
    source = source or policy
    for stale in episode_dir(data_dir, source).glob(".ep_*.tmp-*"):  # left by a worker killed mid-write
        stale.unlink(missing_ok=True)
    tasks = [(seed, str(episode_path(data_dir, source, seed))) for seed in track_seeds]
    tasks = [task for task in tasks if not is_complete_npz(Path(task[1]))]
    return play_episodes(tasks, max_steps, workers, backend, policy, policy_kwargs, f"collect {source}", progress,
                         out_dir=episode_dir(data_dir, source))


def play_episodes(tasks: Sequence[tuple[int, str | None]], max_steps: int = 1000, workers: int = 2,
                  backend: str = "fast", policy: str = "random", policy_kwargs: dict | None = None,
                  desc: str = "play", progress: bool = True, out_dir: Path | None = None) -> list[dict]:
    """Play one episode per (track seed, episode file or None) task over `workers` processes.

    Returns a summary (seed, steps, return) per episode, in the order they finished; with a file
    name the episode is also saved there (atomically). `out_dir` is created once the inputs are checked.
    """
    make_policy(policy, **(policy_kwargs or {}))  # fail fast on a bad policy, before any process starts
    make_env(backend, max_steps).close()  # ... and on a bad or missing backend
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)  # ... and on an output path that cannot be made
    if not tasks:
        return []
    workers = max(1, min(workers, len(tasks)))
    context = mp.get_context("spawn")  # fork after torch/threads is unsafe; spawn costs ~1 s per worker
    counter = context.Value("q", 0)
    init_args = (backend, max_steps, policy, policy_kwargs or {}, counter)
    summaries = []
    bar = tqdm(total=len(tasks) * max_steps, unit="step", desc=desc, disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:  # in-process: no start-up cost, same code path as a worker
            _setup_worker(*init_args)
            for task in tasks:
                summaries.append(_play_one(task))
                _update_bar(bar, counter, summaries)
        else:
            with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
                results = pool.imap_unordered(_play_one, tasks)
                while len(summaries) < len(tasks):
                    try:
                        summaries.append(results.next(timeout=0.5))
                    except mp.TimeoutError:
                        pass
                    _update_bar(bar, counter, summaries)
    finally:
        bar.total = bar.n
        bar.close()
        if "env" in _worker:
            _worker["env"].close()
        _worker.clear()
    return summaries


def evaluate_agent(ckpt_dir: Path, controller: str, episodes: int = 100, seed: int = 1_000_000, workers: int = 2,
                   max_steps: int = 1000, backend: str = "fast", progress: bool = True) -> dict:
    """Play the agent deterministically on track seeds seed..seed+episodes-1; the evaluation contract's dict."""
    load_agent(Path(ckpt_dir), controller)  # one clear error before any worker starts
    start = time.perf_counter()
    summaries = play_episodes([(seed + i, None) for i in range(episodes)], max_steps, workers, backend, "agent",
                              {"ckpt_dir": str(ckpt_dir), "controller": controller}, f"evaluate {controller}", progress)
    returns = [s["return"] for s in sorted(summaries, key=lambda s: s["seed"])]
    return {"env_id": ENV_ID, "episodes": episodes, "seed": seed, "mean": float(np.mean(returns)),
            "std": float(np.std(returns)), "min": float(np.min(returns)), "max": float(np.max(returns)),
            "returns": returns, "controller": controller, "ckpt_dir": str(ckpt_dir), "env_backend": backend,
            "max_steps": max_steps, "wall_seconds": round(time.perf_counter() - start, 1)}


def _update_bar(bar, counter, summaries: list[dict]) -> None:
    bar.update(counter.value - bar.n)
    if summaries:
        bar.set_postfix(episodes=len(summaries), mean_return=f"{np.mean([s['return'] for s in summaries]):.1f}",
                        refresh=False)


def find_or_collect_episodes(data_dir: Path, collect: bool, episodes: int, max_steps: int = 1000, workers: int = 2,
                             backend: str = "fast") -> list[Path]:
    """The episodes under data_dir; with none there, collect `episodes` random ones first (if `collect`)."""
    paths = list_episodes(data_dir)
    if paths:
        return paths
    if not collect:
        raise UserError(f"no episodes in {data_dir}/rollouts/: run collect_data.py --data-dir {data_dir} "
                        "(or drop --no-collect)")
    print(f"no episodes in {data_dir}: collecting {episodes} random ones first")
    collect_episodes(data_dir, range(episodes), max_steps, workers, backend, "random")
    return list_episodes(data_dir)


# ----------------------------------------------------------------------------- the dream

_MASK32 = 0xFFFFFFFF


def _mul32(x, constant: int):
    """(x * constant) mod 2**32 for int64 tensors holding 32-bit values, without int64 overflow."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x):
    """A 32-bit integer mixer (lowbias32) on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds, steps, count: int):
    """Uniform noise in (0, 1), (B, count) float32, a pure function of (seed, step, draw index) per env.

    A dream's randomness then depends only on its own seed and step, never on which other dreams
    share its batch: B single envs reproduce a batch of B exactly, and candidates evaluated on the same
    seeds see the same noise (common random numbers for CMA-ES).
    """
    key = _hash32(_hash32(seeds & _MASK32) ^ (steps & _MASK32))
    bits = _hash32(key.unsqueeze(-1) ^ _hash32(torch.arange(count, device=seeds.device) + 0x9E3779B9))
    return ((bits.double() + 0.5) / 2.0**32).float()


def box_muller(uniform):
    """Standard normal noise (B, n) from uniform noise (B, 2n)."""
    n = uniform.shape[-1] // 2
    return torch.sqrt(-2 * torch.log(uniform[:, :n])) * torch.cos(2 * torch.pi * uniform[:, n:2 * n])


class BatchedDream:
    """B CarRacing dreams inside a world model, stepped together as tensors.

    Observation: [z, h] (B, latent + hidden), the controller's input. A dream starts from the latent
    of a real episode start (a bank stored in the world-model checkpoint), drawn with the env's seed.
    Each step feeds [z, action] to the model, samples the next z with the temperature, and returns
    the predicted reward and done (probability > 0.5); it truncates at `max_steps`. Finished envs are
    restarted by the caller with `reset(seeds, mask)`.
    """

    def __init__(self, world_model, start_mu, start_logvar, num_envs: int, temperature: float = 1.0,
                 max_steps: int = 1000, device="cpu"):
        self.model, self.device = world_model, torch.device(device)
        self.start_mu, self.start_logvar = start_mu.to(self.device), start_logvar.to(self.device)
        self.num_envs, self.temperature, self.max_steps = num_envs, temperature, max_steps
        self.latent_dim = world_model.config.latent_dim
        self.obs_dim = self.latent_dim + world_model.config.hidden_dim
        self.seeds = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.t = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.z = torch.zeros(num_envs, self.latent_dim, device=self.device)
        self.state = world_model.initial_state(num_envs, self.device)
        self.action_low = torch.from_numpy(ACTION_LOW).to(self.device)
        self.action_high = torch.from_numpy(ACTION_HIGH).to(self.device)

    def observation(self):
        return torch.cat([self.z, self.model.features(self.state)], -1)

    def reset(self, seeds, mask=None):
        """(Re)start the envs where `mask` (all if None) with the given seeds (B,); returns the observation."""
        seeds = torch.as_tensor(seeds, dtype=torch.int64, device=self.device)
        mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device) if mask is None else mask
        start = torch.full_like(seeds, -1)  # step -1: the draws that pick and sample the start latent
        uniform = counter_uniform(seeds, start, 1 + 2 * self.latent_dim)
        pick = (uniform[:, 0] * len(self.start_mu)).long().clamp(max=len(self.start_mu) - 1)
        z = self.start_mu[pick] + torch.exp(0.5 * self.start_logvar[pick]) * box_muller(uniform[:, 1:])
        self.seeds = torch.where(mask, seeds, self.seeds)
        self.t = torch.where(mask, torch.zeros_like(self.t), self.t)
        self.z = torch.where(mask[:, None], z, self.z)
        self.state = torch.where(mask[:, None], self.model.initial_state(self.num_envs, self.device), self.state)
        return self.observation()

    def step(self, action):
        """action (B, 3) -> observation (B, obs_dim), reward (B,), terminated (B,), truncated (B,)."""
        with torch.no_grad():
            action = torch.as_tensor(action, dtype=torch.float32, device=self.device)
            action = torch.maximum(torch.minimum(action, self.action_high), self.action_low)
            pred, self.state = self.model.step(self.z, action, self.state)
            uniform = counter_uniform(self.seeds, self.t, 3 * self.latent_dim)  # component picks, then Gaussian noise
            self.z = self.model.sample_next(pred, self.temperature, uniform[:, :self.latent_dim],
                                            box_muller(uniform[:, self.latent_dim:]))
            self.t += 1
            terminated = pred.done_logit > 0  # probability > 0.5
            truncated = (self.t >= self.max_steps) & ~terminated
            return self.observation(), pred.reward, terminated, truncated


class DreamEnv(gym.Env):
    """One dream as a Gymnasium env (`DreamCarRacing-v0`), built from a checkpoint dir alone.

    `gymnasium.make("DreamCarRacing-v0", ckpt_dir=DIR)`; observation [z, h]; the CarRacing action;
    `render()` decodes z to a 64x64 frame. The same step function as BatchedDream (it is one, B=1).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 50}

    def __init__(self, ckpt_dir: str = "checkpoints", temperature: float = 1.0, max_steps: int = 1000,
                 render_mode: str | None = None, device: str = "cpu"):
        self.vae, model, checkpoint = load_vae_and_world_model(Path(ckpt_dir), device)
        bank = checkpoint["start_bank"]
        self.dream = BatchedDream(model, bank["mu"], bank["logvar"], 1, temperature, max_steps, device)
        self.render_mode = render_mode
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (self.dream.obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        dream_seed = int(self.np_random.integers(2**31))  # derived from `seed`, so a seeded reset repeats
        return self.dream.reset([dream_seed])[0].cpu().numpy(), {}

    def step(self, action):
        obs, reward, terminated, truncated = self.dream.step(np.asarray(action, np.float32)[None])
        return obs[0].cpu().numpy(), float(reward[0]), bool(terminated[0]), bool(truncated[0]), {}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        with torch.no_grad():
            frame = self.vae.decode(self.dream.z)[0].permute(1, 2, 0).clamp(0, 1)
        return (frame * 255).round().byte().cpu().numpy()


gym.register("DreamCarRacing-v0", entry_point=DreamEnv)
