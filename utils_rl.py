"""Environments, collection policies, parallel episode collection, evaluation, and PPO.

`make_env` is the one place an environment is built. Collection runs whole episodes in worker
processes (a process pool, not a vector env: each worker steps, preprocesses and writes its own
episode files, so no frame crosses a pipe per step; see the benchmark table in the README).
Episodes are played at the decision clock: each decision is held for ACTION_REPEAT frames
(`ActionRepeat`), one step of an episode file is one decision. The dream lives in dream.py.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import signal
import sys
import time
from pathlib import Path
from typing import Literal, Sequence

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fast_car_racing import make_fast_env
from utils import (CONTROLLER_SCRIPTS, FRAME_SIZE, FeatureTracker, UserError, checkpoint_identity, episode_dir,
                   episode_path, is_complete_npz, list_episodes, load_agent, load_vae_and_world_model, plain,
                   preprocess_frame, resume_controller_checkpoint, save_checkpoint, save_episode)

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


def hold_actions(env: gym.Env, action_repeat: int) -> gym.Env:
    """`env` whose step holds the action for `action_repeat` frames (the decision clock), or env itself at 1."""
    return ActionRepeat(env, action_repeat) if action_repeat > 1 else env


class BrownianPolicy:
    """Smooth random driving that goes along the road and off it: Ornstein-Uhlenbeck noise on steering,
    gas and brake, plus a pull toward the road seen in the frame whose strength itself drifts.

    Pure OU noise (uniform noise only jitters in place) leaves the road within ~50 steps and then
    spends 95% of an episode on grass. Here a slowly wandering `focus` (mean reversion over ~100
    steps) weighs a steer toward the grey pixels ahead: while it is high the car follows the road,
    taking curves at random speeds; while it is low the noise takes it onto the grass, and the pull
    brings it back when the road is still in view. Only the frame is used (no simulator state), so the
    policy works with every backend. Each episode's noise is seeded by its track seed. It decides once per
    `action_repeat` frames (the env holds the action), so its noise moves per decision.
    """

    def __init__(self, action_repeat: int = 4, **_unused):
        self.action_repeat = action_repeat
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
    deterministic agent that evaluation plays. It decides on every frame it is given, at its own action
    repeat (the env holds each decision for that many frames)."""

    def __init__(self, ckpt_dir: str = "checkpoints", controller: str = "cmaes", noise: float = 0.0, **_unused):
        self.agent = load_agent(Path(ckpt_dir), controller)
        self.action_repeat = self.agent.action_repeat
        self.noise = noise
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.agent.reset(seed)
        self.rng = np.random.default_rng([seed, 2])

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        action = self.agent.act(frame)
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
    """Play one episode of at most `max_steps` frames in `env` (hold_actions(make_env(...), the policy's
    action repeat)); step t is decision t: obs[t] is the preprocessed frame action[t] was chosen on,
    reward[t] what its held frames earned. `on_step(frames)` is called after each decision."""
    frame, _ = env.reset(seed=track_seed)
    policy.reset(track_seed)
    repeat = policy.action_repeat
    obs, actions, rewards, terminated, truncated = [], [], [], [], []
    decisions = math.ceil(max_steps / repeat)
    for step in range(decisions):
        small = preprocess_frame(frame)
        action = policy(small)
        frame, reward, term, trunc, _ = env.step(action)
        trunc = trunc or (step == decisions - 1 and not term)
        obs.append(small), actions.append(action), rewards.append(reward)
        terminated.append(term), truncated.append(trunc)
        if on_step is not None:
            on_step(repeat)
        if term or trunc:
            break
    return {"obs": np.stack(obs), "action": np.stack(actions), "reward": np.array(rewards, np.float32),
            "terminated": np.array(terminated), "truncated": np.array(truncated), "seed": track_seed,
            "action_repeat": repeat}


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
    policy = make_policy(policy_name, **policy_kwargs)
    _worker.update(env=hold_actions(make_env(backend, max_steps), policy.action_repeat), policy=policy,
                   max_steps=max_steps, counter=step_counter, pending=0)


def _count_step(frames: int) -> None:
    _worker["pending"] += frames
    if _worker["pending"] >= 200:  # batch the shared-counter updates: a lock per step is measurable
        with _worker["counter"].get_lock():
            _worker["counter"].value += _worker["pending"]
        _worker["pending"] = 0


def _play_one(task: tuple[int, str | None]) -> dict:
    track_seed, path = task
    episode = rollout_episode(_worker["env"], _worker["policy"], track_seed, _worker["max_steps"], _count_step)
    if path is not None:
        save_episode(Path(path), episode)
    with _worker["counter"].get_lock():
        _worker["counter"].value += _worker["pending"]
    _worker["pending"] = 0
    return {"seed": track_seed, "steps": len(episode["reward"]), "frames": len(episode["reward"]) * episode["action_repeat"],
            "return": float(episode["reward"].sum())}


def collect_episodes(data_dir: Path, track_seeds: Sequence[int], max_steps: int = 1000, workers: int = 2,
                     backend: str = "fast", policy: str = "random", policy_kwargs: dict | None = None,
                     source: str | None = None, progress: bool = True) -> list[dict]:
    """Collect one episode file per track seed into data_dir/rollouts/<source>/, skipping complete ones.
    The random policy's action repeat is `policy_kwargs["action_repeat"]` (4 if absent); an agent uses its own.

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

    Returns a summary (seed, steps (decisions), frames, return) per episode, in the order they finished;
    with a file name the episode is also saved there (atomically). `out_dir` is created once the inputs are checked.
    """
    if not tasks:
        return []
    make_policy(policy, **(policy_kwargs or {}))  # fail fast on a bad policy, before any process starts
    make_env(backend, max_steps).close()  # ... and on a bad or missing backend
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)  # ... and on an output path that cannot be made
    workers = max(1, min(workers, len(tasks)))
    context = mp.get_context("spawn")  # fork after torch/threads is unsafe; spawn costs ~1 s per worker
    counter = context.Value("q", 0)
    init_args = (backend, max_steps, policy, policy_kwargs or {}, counter)
    summaries = []
    bar = tqdm(total=len(tasks) * max_steps, unit="frame", desc=desc, disable=not progress, dynamic_ncols=True)
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
                   max_steps: int = 1000, backend: str = "fast", progress: bool = True, noise: float = 0.0) -> dict:
    """Play the agent on track seeds seed..seed+episodes-1, deterministically (or with Gaussian `noise` on its
    actions, seeded by the track: the same call gives the same returns); the evaluation contract's dict."""
    load_agent(Path(ckpt_dir), controller)  # one clear error before any worker starts
    start = time.perf_counter()
    summaries = play_episodes([(seed + i, None) for i in range(episodes)], max_steps, workers, backend, "agent",
                              {"ckpt_dir": str(ckpt_dir), "controller": controller, "noise": noise},
                              f"evaluate {controller}", progress)
    returns = [s["return"] for s in sorted(summaries, key=lambda s: s["seed"])]
    return {"env_id": ENV_ID, "episodes": episodes, "seed": seed, "mean": float(np.mean(returns)),
            "std": float(np.std(returns)), "min": float(np.min(returns)), "max": float(np.max(returns)),
            "returns": returns, "controller": controller, "ckpt_dir": str(ckpt_dir), "env_backend": backend,
            "max_steps": max_steps, "noise": noise, "frames": int(sum(s["frames"] for s in summaries)),
            "wall_seconds": round(time.perf_counter() - start, 1)}


def _update_bar(bar, counter, summaries: list[dict]) -> None:
    bar.update(counter.value - bar.n)
    if summaries:
        bar.set_postfix(episodes=len(summaries), mean_return=f"{np.mean([s['return'] for s in summaries]):.1f}",
                        refresh=False)


def find_or_collect_episodes(data_dir: Path, collect: bool, episodes: int, max_steps: int = 1000, workers: int = 2,
                             backend: str = "fast", action_repeat: int = 4) -> list[Path]:
    """The episodes under data_dir; with none there, collect `episodes` random ones first (if `collect`)."""
    paths = list_episodes(data_dir)
    if paths:
        return paths
    if not collect:
        raise UserError(f"no episodes in {data_dir}/rollouts/: run collect_data.py --data-dir {data_dir} "
                        "(or drop --no-collect)")
    print(f"no episodes in {data_dir}: collecting {episodes} random ones first")
    collect_episodes(data_dir, range(episodes), max_steps, workers, backend, "random", {"action_repeat": action_repeat})
    return list_episodes(data_dir)


# ----------------------------------------------------------------------------- PPO


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a rollout of T steps of N envs.

    rewards, values, dones (T, N): dones[t] is set when the episode ended at step t (its value target
    then stops there; a truncation's bootstrap is already folded into its reward); last_value (N,) is
    the value of the observation after the last step. Returns advantages and value targets, (T, N).
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(len(rewards))):
        alive = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_value * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


class RewardScaler:
    """Divide rewards by the running std of the discounted return (the usual PPO reward normalisation):
    CarRacing's +1000/N tile rewards and its -100 exit then reach the critic on a unit scale."""

    def __init__(self, num_envs: int, gamma: float):
        from actor_critic import RunningNorm

        self.gamma, self.returns, self.stats = gamma, torch.zeros(num_envs), RunningNorm(1)

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        self.returns = self.returns * self.gamma + reward
        self.stats.update(self.returns[:, None])
        self.returns = self.returns * ~done
        return reward / torch.sqrt(self.stats.var + 1e-8)

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)


def ppo_update(model, optimizer, batch: dict, epochs: int, minibatches: int, clip_coef: float, ent_coef: float,
               vf_coef: float, max_grad_norm: float, target_kl: float = 0.0) -> dict:
    """The clipped PPO update on one rollout. batch: obs (B, D), sample (B, 3) (the distribution's own
    sample), log_prob, advantage, value_target (B,). Advantages are normalised per minibatch; with
    target_kl > 0 the epochs stop early once the policy moved that far. Returns the last epoch's means."""
    size = len(batch["obs"])
    minibatch = max(1, size // minibatches)
    for epoch in range(epochs):
        stats = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": [], "clip_fraction": []}
        permutation = torch.randperm(size)
        for start in range(0, size - minibatch + 1, minibatch):
            index = permutation[start:start + minibatch]
            dist = model.policy(batch["obs"][index])
            log_ratio = dist.log_prob(batch["sample"][index]) - batch["log_prob"][index]
            ratio = log_ratio.exp()
            advantage = batch["advantage"][index]
            advantage = (advantage - advantage.mean()) / (advantage.std(unbiased=False) + 1e-8)
            policy_loss = torch.max(-advantage * ratio,
                                    -advantage * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
            value_loss = 0.5 * (model.value(batch["obs"][index]) - batch["value_target"][index]).pow(2).mean()
            entropy = dist.entropy().mean()
            loss = policy_loss - ent_coef * entropy + vf_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))  # the low-variance estimator
                stats["clip_fraction"].append(float(((ratio - 1).abs() > clip_coef).float().mean()))
            stats["policy_loss"].append(policy_loss.item()), stats["value_loss"].append(value_loss.item())
            stats["entropy"].append(entropy.item())
        if target_kl and np.mean(stats["approx_kl"]) > target_kl:
            break
    return {name: float(np.mean(values)) for name, values in stats.items()} | {"epochs": epoch + 1}


class ActionRepeat(gym.Wrapper):
    """Hold each action for `repeat` frames, summing their rewards; the episode may end on any of them.

    Only the last frame is drawn where the env allows it (FastCarRacing.draw_state): drawing is ~1.35 ms
    of a 1.4 ms step and the physics 0.05 ms, so 4 frames per decision cost about as much as 1.
    """

    def __init__(self, env: gym.Env, repeat: int):
        super().__init__(env)
        self.repeat = repeat
        self.can_skip = hasattr(env.unwrapped, "draw_state")

    def step(self, action):
        total = 0.0
        for frame in range(self.repeat):
            if self.can_skip:
                self.env.unwrapped.draw_state = frame == self.repeat - 1
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        if obs is None:  # ended on an undrawn frame: draw it now (the score digits may lag by one step)
            self.env.unwrapped.draw_state = True
            obs = self.env.unwrapped._render("state_pixels")
        if self.can_skip:
            self.env.unwrapped.draw_state = True  # reset() draws its first frame
        return obs, total, terminated, truncated, info


class NoProgressStop(gym.Wrapper):
    """End a training episode (terminated) after `frames` frames in a row without a new road tile.

    Only new tiles pay in CarRacing (every other frame costs 0.1), so such a stretch is the car lost on the
    grass or standing still; cutting it spends the training steps where the policy can still learn.
    """

    def __init__(self, env: gym.Env, frames: int):
        super().__init__(env)
        self.frames, self.since_tile = frames, 0

    def reset(self, **kwargs):
        self.since_tile = 0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.since_tile = 0 if reward > 0 else self.since_tile + 1
        return obs, reward, terminated or self.since_tile >= self.frames, truncated, info


class _PreprocessedEnv(gym.ObservationWrapper):
    """make_env(backend) whose observation is the preprocessed 64x64 frame (done in the env's own
    worker process, so only 12 KB per step cross the pipe), optionally with ActionRepeat and
    NoProgressStop (0: off) for training."""

    def __init__(self, backend: str, max_steps: int, action_repeat: int = 1, no_progress_frames: int = 0):
        env = make_env(backend, max_steps)
        if no_progress_frames:
            env = NoProgressStop(env, no_progress_frames)
        super().__init__(hold_actions(env, action_repeat))
        self.observation_space = gym.spaces.Box(0, 255, (FRAME_SIZE, FRAME_SIZE, 3), np.uint8)

    def observation(self, frame: np.ndarray) -> np.ndarray:
        return preprocess_frame(frame)


def _env_batch_worker(connection, count: int, env_kwargs: dict) -> None:
    """A worker process of ProcessVectorEnv: `count` preprocessed envs in one gymnasium SyncVectorEnv."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and closes us
    _die_with_parent()
    envs = gym.vector.SyncVectorEnv([lambda: _PreprocessedEnv(**env_kwargs)] * count,
                                    autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    while True:
        command, payload = connection.recv()
        if command == "reset":
            connection.send(envs.reset(seed=payload)[0])
        elif command == "step":
            frames, reward, terminated, truncated, info = envs.step(payload)
            done = terminated | truncated
            last = np.stack([info["final_obs"][i] if done[i] else frames[i] for i in range(count)])
            connection.send((frames, reward, terminated, truncated, last))
        else:
            envs.close()
            connection.close()
            return


class ProcessVectorEnv:
    """N preprocessed CarRacing envs over W worker processes, N / W in each (a gymnasium SyncVectorEnv
    per worker, same-step autoreset). gymnasium's AsyncVectorEnv runs one process per env: measured
    here, 2 processes step 930-990 env steps/s and 4 only 745, so several envs share each process.

    `step` returns frames, reward, terminated, truncated (N,) and last_frames: for an env whose
    episode ended at this step, its episode's last frame (frames then holds the next episode's first).
    """

    def __init__(self, num_envs: int, backend: str = "fast", max_steps: int = 1000, workers: int = 2,
                 action_repeat: int = 1, no_progress_frames: int = 0):
        make_env(backend, max_steps).close()  # a bad backend fails here, in one line, not in a worker
        env_kwargs = {"backend": backend, "max_steps": max_steps, "action_repeat": action_repeat,
                      "no_progress_frames": no_progress_frames}
        workers = max(1, min(workers, num_envs))
        self.counts = [num_envs // workers + (i < num_envs % workers) for i in range(workers)]
        context = mp.get_context("spawn")
        self.connections, self.processes = [], []
        for count in self.counts:
            parent, child = context.Pipe()
            process = context.Process(target=_env_batch_worker, args=(child, count, env_kwargs), daemon=True)
            process.start()
            child.close()
            self.connections.append(parent), self.processes.append(process)

    def reset(self, seed: int) -> np.ndarray:
        """Env i starts on track seed seed + i, then draws its own stream of tracks."""
        offsets = np.cumsum([0] + self.counts[:-1])
        for connection, offset in zip(self.connections, offsets):
            connection.send(("reset", seed + int(offset)))
        return np.concatenate([connection.recv() for connection in self.connections])

    def step(self, actions: np.ndarray):
        bounds = np.cumsum([0] + self.counts)
        for connection, start, stop in zip(self.connections, bounds[:-1], bounds[1:]):
            connection.send(("step", actions[start:stop]))
        results = [connection.recv() for connection in self.connections]  # the workers step in parallel
        return tuple(np.concatenate(parts) for parts in zip(*results))

    def close(self) -> None:
        for connection, process in zip(self.connections, self.processes):
            try:
                connection.send(("close", None))
            except OSError:
                pass
            process.join(timeout=5)
            if process.is_alive():
                process.kill()


class RealFeatureEnvs:
    """N real CarRacing envs in worker processes (ProcessVectorEnv), seen through the agent's features
    [z, h] (the frozen VAE and world model; h carried online per env). A step is one decision held for
    the world model's action repeat k frames, and h steps once per decision, as `utils.Agent` does.

    Same-step autoreset: the step that ends an episode returns the next episode's first observation,
    and that step's reward and flags; `final_obs` then holds, for the envs that ended, the features of
    the episode's last frame (to bootstrap a truncated episode's value). Torch tensors in and out.
    """

    kind = "real"

    def __init__(self, ckpt_dir: Path, num_envs: int, backend: str = "fast", max_steps: int = 1000, seed: int = 0,
                 device="cpu", workers: int = 2, no_progress_frames: int = 0):
        vae, world_model, _ = load_vae_and_world_model(Path(ckpt_dir), device)
        action_repeat = world_model.config.action_repeat
        self.num_envs, self.seed, self.device, self.action_repeat = num_envs, seed, device, action_repeat
        self.obs_dim = world_model.config.latent_dim + world_model.config.hidden_dim
        self.features = FeatureTracker(vae, world_model, num_envs, device)
        self.envs = ProcessVectorEnv(num_envs, backend, max_steps, workers, action_repeat, no_progress_frames)

    def reset(self) -> torch.Tensor:
        frames = self.envs.reset(self.seed)
        self.features.reset()
        return self.features.observe(frames)

    def step(self, actions: torch.Tensor):
        """actions (N, 3) -> obs (N, D), reward (N,), terminated (N,), truncated (N,), final_obs (N, D)."""
        frames, reward, terminated, truncated, last_frames = self.envs.step(actions.cpu().numpy())
        self.features.remember(actions)
        done = torch.from_numpy(terminated | truncated)
        final_obs = None
        if done.any():  # the features of each ended episode's last frame, with the memory of its last step
            final_obs = torch.cat([self.features.encode(last_frames), self.features.world_model.features(
                self.features.state)], -1)
        self.features.reset(done)
        obs = self.features.observe(frames)
        final_obs = obs if final_obs is None else torch.where(done[:, None].to(obs.device), final_obs, obs)
        return (obs, torch.as_tensor(reward, dtype=torch.float32), torch.from_numpy(terminated),
                torch.from_numpy(truncated), final_obs)

    def close(self) -> None:
        self.envs.close()


@dataclasses.dataclass
class ControllerStageArgs:
    """Flags every controller stage shares (train_ppo.py, train_ppo_in_dream.py, train_cmaes_in_dream.py)."""

    ckpt_dir: Path = Path("checkpoints")
    """reads vae.pt and world_model.pt, writes controller_<name>.pt and <name>_latest.pt"""
    log_dir: Path = Path("runs")
    max_steps: int = 1000
    """episode length"""
    eval_every: int = 20
    """play the current controller deterministically in the real env every this many updates or
    generations (0: never)"""
    eval_episodes: int = 4
    eval_seed: int = 5_000_000
    """real tracks for those checks (apart from the final evaluation's 1,000,000+)"""
    workers: int = 2
    """worker processes for the real envs (training envs and checks)"""
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    fresh: bool = False
    """ignore <name>_latest.pt and start over"""


@dataclasses.dataclass
class PPOArgs(ControllerStageArgs):
    """Flags of the PPO stages (train_ppo.py, train_ppo_in_dream.py)."""

    total_steps: int = 1_000_000
    """env steps over all envs (a resumed run trains up to this many)"""
    num_envs: int = 8
    rollout_steps: int = 128
    """steps per env between updates"""
    learning_rate: float = 3e-4
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over total_steps"""
    gamma: float = 0.99
    gae_lambda: float = 0.95
    update_epochs: int = 10
    minibatches: int = 8
    clip_coef: float = 0.2
    ent_coef: float = 0.0
    vf_coef: float = 0.5
    max_grad_norm: float = 0.5
    target_kl: float = 0.0
    """stop an update's epochs once the approximate KL passes this (0: never)"""
    hidden_dim: int = 256
    distribution: Literal["beta", "tanh_normal"] = "beta"
    """the actor's distribution over the bounded action"""


def train_ppo(args: PPOArgs, envs, name: str, device, extra_eval=None, warm_start: bool = False) -> dict:
    """The PPO loop shared by train_ppo.py (real envs) and train_ppo_in_dream.py (dreams).

    `envs`: RealFeatureEnvs, DreamFeatureEnvs or ImaginedFeatureEnvs. With `warm_start`, a <name>_latest.pt
    trained in an earlier world model lends its weights (actor-critic, optimizer, reward scaler) and the
    updates count again from 0 in the current one (the on-policy rounds of the dream loop). Writes CKPT_DIR/controller_<name>.pt (the actor-critic,
    with the identities of the VAE and world model) and <name>_latest.pt (plus optimizer and reward
    scaler: re-running resumes) after every update, TensorBoard scalars under LOG_DIR/<name>-<time>/
    (`<kind>/episode_return` for the training episodes, `eval/real_return` every EVAL_EVERY updates, and
    whatever `extra_eval(model)` returns then). Returns the last metrics.
    """
    from torch.utils.tensorboard import SummaryWriter

    from actor_critic import ActorCritic, ControllerConfig, to_env_action

    batch_size = args.num_envs * args.rollout_steps  # decisions per update
    frames_per_update = batch_size * envs.action_repeat  # env steps (frames), what TOTAL_STEPS counts
    updates = args.total_steps // frames_per_update
    if updates < 1 or args.minibatches < 1 or args.update_epochs < 1:
        raise UserError(f"--total-steps ({args.total_steps}) must hold at least one rollout of --num-envs x "
                        f"--rollout-steps x action repeat ({frames_per_update}); --minibatches and --update-epochs at least 1")
    identities = {"vae": checkpoint_identity(args.ckpt_dir / "vae.pt"),
                  "world_model": checkpoint_identity(args.ckpt_dir / "world_model.pt")}
    config = ControllerConfig(kind="actor_critic", obs_dim=envs.obs_dim, hidden_dim=args.hidden_dim,
                              distribution=args.distribution, action_repeat=envs.action_repeat)
    model = ActorCritic(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5)
    scaler = RewardScaler(args.num_envs, args.gamma)
    latest_path, out_path = args.ckpt_dir / f"{name}_latest.pt", args.ckpt_dir / f"controller_{name}.pt"

    start_update, log_dir = 0, args.log_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoint = resume_controller_checkpoint(latest_path, args.fresh, identities["world_model"]["sha256"], config,
                                              CONTROLLER_SCRIPTS[name], device, warm_start)
    if checkpoint:
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["reward_scaler"])
        log_dir = Path(checkpoint["log_dir"])
        if not checkpoint.get("warm_start"):
            start_update = checkpoint["update"]
            print(f"resuming from {latest_path}: update {start_update} of {updates}, {checkpoint['env_steps']} env steps")
    if hasattr(envs, "skip"):  # a resumed run draws new dream seeds, not the ones it already trained on
        envs.skip(start_update * args.rollout_steps)
    if start_update >= updates:
        print(f"{latest_path} has already trained {start_update} updates; nothing to do")
        return checkpoint["metrics"]

    print(f"PPO ({args.distribution} actor) on {envs.num_envs} {envs.kind} envs: {updates} updates of "
          f"{batch_size} decisions x {envs.action_repeat} frames ({updates * frames_per_update:,} env steps) on {device}; logs in {log_dir}")
    writer = SummaryWriter(log_dir)
    writer.add_text("args", str(plain(args)))
    shape = (args.rollout_steps, args.num_envs)
    buffer = {"obs": torch.zeros(*shape, envs.obs_dim, device=device), "sample": torch.zeros(*shape, 3, device=device),
              **{key: torch.zeros(shape, device=device) for key in ("log_prob", "value", "reward", "done")}}
    episode_returns, finished, recent = torch.zeros(args.num_envs), [], []  # finished: this update's
    metrics: dict = {}
    obs = envs.reset().to(device)
    bar = tqdm(total=updates * frames_per_update, initial=start_update * frames_per_update, unit="step", desc=name,
               dynamic_ncols=True)
    try:
        # updates before this run's first: in earlier world models (a warm start) and in this one (a resume)
        total_updates = checkpoint.get("total_updates", checkpoint["update"]) - start_update if checkpoint else 0
        for update in range(start_update, updates):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - update / updates)
            rollout_start = time.perf_counter()
            for t in range(args.rollout_steps):
                with torch.no_grad():
                    dist = model.policy(obs)
                    sample = dist.sample()
                    buffer["log_prob"][t], buffer["value"][t] = dist.log_prob(sample), model.value(obs)
                buffer["obs"][t], buffer["sample"][t] = obs, sample
                obs, reward, terminated, truncated, final_obs = envs.step(to_env_action(dist.unit_action(sample)))
                obs, reward, final_obs = obs.to(device), reward.cpu(), final_obs.to(device)
                done = (terminated | truncated).cpu()
                episode_returns += reward
                finished += episode_returns[done].tolist()
                episode_returns[done] = 0
                scaled = scaler(reward, done).to(device)
                if truncated.any():  # the episode was cut, not over: bootstrap from its last observation
                    with torch.no_grad():
                        scaled += args.gamma * model.value(final_obs) * truncated.to(device).float()
                buffer["reward"][t], buffer["done"][t] = scaled, done.to(device).float()
            with torch.no_grad():
                advantage, value_target = gae(buffer["reward"], buffer["value"], buffer["done"], model.value(obs),
                                              args.gamma, args.gae_lambda)
            rollout_seconds = time.perf_counter() - rollout_start
            batch = {key: buffer[key].flatten(0, 1) for key in ("obs", "sample", "log_prob")}
            batch |= {"advantage": advantage.flatten(), "value_target": value_target.flatten()}
            metrics = ppo_update(model, optimizer, batch, args.update_epochs, args.minibatches, args.clip_coef,
                                 args.ent_coef, args.vf_coef, args.max_grad_norm, args.target_kl)
            model.obs_norm.update(batch["obs"])  # between updates: see RunningNorm
            if not all(math.isfinite(value) for value in metrics.values()):
                raise UserError(f"PPO diverged at update {update + 1} ({metrics}); the last good checkpoint is "
                                f"{latest_path}")
            env_steps = (update + 1) * frames_per_update
            metrics |= {"steps_per_second": frames_per_update / rollout_seconds,
                        "explained_variance": float(1 - (value_target - buffer["value"]).var() / value_target.var())}
            for value in finished:
                writer.add_scalar(f"{envs.kind}/episode_return", value, env_steps)
            recent = (recent + finished)[-20:]
            finished = []
            if recent:
                metrics[f"{envs.kind}_episode_return"] = float(np.mean(recent))  # the last 20 episodes
            for key, value in metrics.items():
                writer.add_scalar(f"ppo/{key}", value, env_steps)
            writer.add_scalar("ppo/learning_rate", optimizer.param_groups[0]["lr"], env_steps)
            checkpoint = {"config": plain(config), "state_dict": model.state_dict(), "args": plain(args),
                          "update": update + 1, "total_updates": total_updates + update + 1, "env_steps": env_steps,
                          "metrics": metrics, "log_dir": str(log_dir), **identities}
            save_checkpoint(out_path, checkpoint)
            save_checkpoint(latest_path, {**checkpoint, "optimizer": optimizer.state_dict(),
                                          "reward_scaler": scaler.state_dict()})
            if args.eval_every and ((update + 1) % args.eval_every == 0 or update + 1 == updates):
                real = evaluate_agent(args.ckpt_dir, name, args.eval_episodes, args.eval_seed, args.workers,
                                      args.max_steps, progress=False)
                writer.add_scalar("eval/real_return", real["mean"], env_steps)
                line = f"update {update + 1}: real env {real['mean']:.1f} ± {real['std']:.1f} over {args.eval_episodes} tracks"
                for key, value in (extra_eval(model) if extra_eval else {}).items():
                    writer.add_scalar(f"eval/{key}", value, env_steps)
                    line += f", {key.replace('_', ' ')} {value:.1f}"
                    metrics[key] = value
                bar.write(line)
                metrics["real_return"] = real["mean"]
            bar.update(frames_per_update)
            bar.set_postfix(ret=f"{metrics.get(f'{envs.kind}_episode_return', float('nan')):.1f}",
                            sps=f"{metrics['steps_per_second']:.0f}", kl=f"{metrics['approx_kl']:.3f}", refresh=False)
    finally:
        bar.close()
        writer.close()
        envs.close()
    print(f"controller in {out_path}")
    return metrics
