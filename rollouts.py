"""Whole episodes in worker processes: the collection policies (smooth random driving, an agent with
optional noise), one rollout loop, parallel collection into episode files, and evaluation.

A process pool, not a vector env: each worker steps, preprocesses and writes its own episode files, so
no frame crosses a pipe per step (see the benchmark table in the README). Episodes are played at the
decision clock: each decision is held for ACTION_REPEAT frames (`envs.ActionRepeat`), and one step of
an episode file is one decision.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import signal
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import gymnasium as gym
import numpy as np
import torch
from tqdm import tqdm

import cluster
from agent import agent_files_of, load_agent
from envs import ENV_ID, _die_with_parent, hold_actions, make_env
from episodes import encode_episode, episode_dir, episode_path, is_complete_npz, list_episodes, save_episode
from utils import UserError, atomic_write, file_sha256, pick_device, preprocess_frame


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
    """A trained agent (VAE + world model + controller from a checkpoint dir, agent.Agent) as a collection
    policy, with optional exploration noise (seeded per track); noise 0 is the deterministic agent that
    evaluation plays. It decides on every frame it is given, at its own action repeat (the env holds each
    decision for that many frames)."""

    def __init__(self, ckpt_dir: str = "checkpoints", controller: str = "cmaes", noise: float = 0.0,
                 device: str = "cpu", **_unused):
        self.agent = load_agent(Path(ckpt_dir), controller, pick_device(device), noise=noise)
        self.action_repeat = self.agent.action_repeat

    def reset(self, seed: int) -> None:
        self.agent.reset(seed)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        return self.agent.act(frame)


POLICIES = {"random": BrownianPolicy, "agent": AgentPolicy}


def make_policy(name: str, **kwargs):
    if name not in POLICIES:
        raise UserError(f"unknown collection policy {name!r}: choose one of {', '.join(POLICIES)}")
    return POLICIES[name](**kwargs)


class Step(NamedTuple):
    """One env step of `drive`."""
    frame: np.ndarray  # (64, 64, 3) uint8: the preprocessed frame the action was chosen on
    action: np.ndarray  # (3,) float32
    reward: float
    terminated: bool
    truncated: bool  # also set on the last of MAX_STEPS steps


def drive(env: gym.Env, policy, track_seed: int, max_steps: int) -> Iterator[Step]:
    """The one real-env loop (collection, evaluation, play, video and profiling): the track and the policy
    start from TRACK_SEED, then each env step preprocesses the frame, asks the policy (`reset(seed)`,
    `policy(frame) -> action`) and steps, for at most MAX_STEPS steps. The caller sees the env in between
    (to render it); stopping early is closing the generator."""
    frame, _ = env.reset(seed=track_seed)
    policy.reset(track_seed)
    for step in range(max_steps):
        small = preprocess_frame(frame)
        action = policy(small)
        frame, reward, terminated, truncated, _ = env.step(action)
        yield Step(small, action, float(reward), bool(terminated), bool(truncated or (step == max_steps - 1
                                                                                      and not terminated)))
        if terminated or truncated:
            return


def rollout_episode(env: gym.Env, policy, track_seed: int, max_steps: int, on_step=None) -> dict:
    """Play one episode of at most `max_steps` frames in `env` (hold_actions(make_env(...), the policy's
    action repeat)); step t is decision t: obs[t] is the preprocessed frame action[t] was chosen on,
    reward[t] what its held frames earned. `on_step(frames)` is called after each decision."""
    repeat = policy.action_repeat
    steps = []
    for step in drive(env, policy, track_seed, math.ceil(max_steps / repeat)):
        steps.append(step)
        if on_step is not None:
            on_step(repeat)
    return episode_from_steps(steps, track_seed, repeat)


def episode_from_steps(steps: Sequence[Step], track_seed: int, action_repeat: int) -> dict:
    """`drive`'s steps as an episode (the contract of episodes.save_episode)."""
    frames, actions, rewards, terminated, truncated = zip(*steps)
    return {"obs": np.stack(frames), "action": np.stack(actions), "reward": np.array(rewards, np.float32),
            "terminated": np.array(terminated), "truncated": np.array(truncated), "seed": track_seed,
            "action_repeat": action_repeat}


_worker: dict = {}  # per worker process: its env, policy and settings, built once by _setup_worker


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


def episode_summary(episode: dict) -> dict:
    """What a caller of play_episodes gets back per episode: seed, steps (decisions), frames, return."""
    steps = len(episode["reward"])
    return {"seed": int(episode["seed"]), "steps": steps, "frames": steps * int(episode["action_repeat"]),
            "return": float(episode["reward"].sum())}


def _play_one(task: tuple[int, str | None]) -> dict:
    track_seed, path = task
    episode = rollout_episode(_worker["env"], _worker["policy"], track_seed, _worker["max_steps"], _count_step)
    if path is not None:
        save_episode(Path(path), episode)
    with _worker["counter"].get_lock():
        _worker["counter"].value += _worker["pending"]
    _worker["pending"] = 0
    return episode_summary(episode)


def collect_episodes(data_dir: Path, track_seeds: Sequence[int], max_steps: int = 1000, workers: int = 2,
                     backend: str = "fast", policy: str = "random", policy_kwargs: dict | None = None,
                     source: str | None = None, progress: bool = True, ray_address: str | None = None) -> list[dict]:
    """Collect one episode file per track seed into data_dir/rollouts/<source>/, skipping complete ones.
    The random policy's action repeat is `policy_kwargs["action_repeat"]` (4 if absent); an agent uses its own.
    With RAY_ADDRESS the episodes are played on that Ray cluster and written here (see play_episodes).

    Returns a summary (seed, steps, return) of each episode collected now. Safe to kill at any
    moment: files appear only when complete, and a re-run collects just the missing seeds.
    """
    source = source or policy
    for stale in episode_dir(data_dir, source).glob(".ep_*.tmp-*"):  # left by a worker killed mid-write
        stale.unlink(missing_ok=True)
    tasks = [(seed, str(episode_path(data_dir, source, seed))) for seed in track_seeds]
    tasks = [task for task in tasks if not is_complete_npz(Path(task[1]))]
    return play_episodes(tasks, max_steps, workers, backend, policy, policy_kwargs, f"collect {source}", progress,
                         out_dir=episode_dir(data_dir, source), ray_address=ray_address)


def play_episodes(tasks: Sequence[tuple[int, str | None]], max_steps: int = 1000, workers: int = 2,
                  backend: str = "fast", policy: str = "random", policy_kwargs: dict | None = None,
                  desc: str = "play", progress: bool = True, out_dir: Path | None = None,
                  on_result=None, ray_address: str | None = None) -> list[dict]:
    """Play one episode per (track seed, episode file or None) task over `workers` processes, or with
    RAY_ADDRESS over the CPUs of that Ray cluster (`cluster.py`).

    Returns a summary (seed, steps (decisions), frames, return) per episode, in the order they finished;
    with a file name the episode is also saved there (atomically: by the worker, or on a cluster by this
    process once the episode came back, so a node never writes into the driver's directory). `out_dir` is
    created once the inputs are checked. `on_result(summaries so far)` is called as each episode finishes.
    """
    if not tasks:
        return []
    if ray_address is not None and (policy_kwargs or {}).get("device", "cpu") != "cpu":
        # tasks hold a CPU each, not a GPU: each would open its own CUDA context, or fail on a node without one
        raise UserError("on a Ray cluster the agents play on the nodes' CPUs: use --device cpu with --ray-address")
    make_policy(policy, **(policy_kwargs or {}))  # fail fast on a bad policy, before any process starts
    make_env(backend, max_steps).close()  # ... and on a bad or missing backend
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)  # ... and on an output path that cannot be made
    if ray_address is not None:
        return _play_on_cluster(ray_address, tasks, max_steps, backend, policy, policy_kwargs or {}, desc, progress,
                                on_result)
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
                _update_bar(bar, counter.value, summaries)
                if on_result is not None:
                    on_result(summaries)
        else:
            with context.Pool(workers, initializer=_init_worker, initargs=init_args) as pool:
                results = pool.imap_unordered(_play_one, tasks)
                while len(summaries) < len(tasks):
                    try:
                        summaries.append(results.next(timeout=0.5))
                        if on_result is not None:
                            on_result(summaries)
                    except mp.TimeoutError:
                        pass
                    _update_bar(bar, counter.value, summaries)
    finally:
        bar.total = bar.n
        bar.close()
        if "env" in _worker:
            _worker["env"].close()
        _worker.clear()
    return summaries


def _cluster_episode(shared: dict, task: tuple[int, str | None]) -> tuple[dict, dict | None]:
    """A Ray task (cluster_map): play one episode on a cluster node; its file's bytes come back only when the
    driver is to save it. The env and policy are built once per worker process and setting."""
    track_seed, path = task
    if _worker.get("key") != shared["key"]:
        kwargs = dict(shared["policy_kwargs"])
        if shared["agent_files"]:
            kwargs["ckpt_dir"] = str(cluster.local_copy(shared["agent_files"]))
        if "env" in _worker:
            _worker["env"].close()
        _worker.clear()
        cluster.worker_threads()
        _setup_worker(shared["backend"], shared["max_steps"], shared["policy"], kwargs, None)
        _worker["key"] = shared["key"]
    episode = rollout_episode(_worker["env"], _worker["policy"], track_seed, _worker["max_steps"])
    # the file's bytes, compressed here: a node sends ~0.3 MB, not 3 MB of frames, and the driver only writes
    return episode_summary(episode) | {"node": cluster.node_id()}, (encode_episode(episode) if path else None)


def _play_on_cluster(address: str, tasks, max_steps: int, backend: str, policy: str, policy_kwargs: dict, desc: str,
                     progress: bool, on_result) -> list[dict]:
    """play_episodes on a Ray cluster: an agent's checkpoint files travel once per call; each episode is
    saved here as it comes back, by the same atomic episode writer, once (a retried task yields once)."""
    cluster.connect(address)  # (a cluster that cannot be reached is one line, before any progress bar)
    agent_files = None
    if policy == "agent":
        ckpt_dir, controller = Path(policy_kwargs["ckpt_dir"]), policy_kwargs["controller"]
        agent_files = cluster.ship_files(agent_files_of(ckpt_dir, controller), root=ckpt_dir)
    files_key = cluster.content_key(agent_files) if agent_files else "-"
    key = f"{policy}-{backend}-{max_steps}-{sorted(policy_kwargs.items())}-{files_key}"
    shared = {"key": key, "backend": backend, "max_steps": max_steps, "policy": policy,
              "policy_kwargs": policy_kwargs, "agent_files": agent_files}
    summaries = []
    bar = tqdm(total=len(tasks) * max_steps, unit="frame", desc=f"{desc} (ray)", disable=not progress,
               dynamic_ncols=True)
    try:
        for (_, path), (summary, episode) in cluster.cluster_map(address, _cluster_episode, shared, tasks):
            if path is not None:
                save_episode(Path(path), episode)
            summaries.append(summary)
            _update_bar(bar, bar.n + summary["frames"], summaries)
            if on_result is not None:
                on_result(summaries)
    finally:
        bar.total = bar.n
        bar.close()
    return summaries


def evaluate_agent(ckpt_dir: Path, controller: str, episodes: int = 100, seed: int = 1_000_000, workers: int = 2,
                   max_steps: int = 1000, backend: str = "fast", progress: bool = True, noise: float = 0.0,
                   progress_file: Path | None = None, ray_address: str | None = None, device: str = "cpu") -> dict:
    """Play the agent on track seeds seed..seed+episodes-1, deterministically (or with Gaussian `noise` on its
    actions, seeded by the track: the same call gives the same returns); the evaluation contract's dict.

    With PROGRESS_FILE each finished episode is recorded there (atomically), and a re-run of the same
    evaluation (same agent files and settings) plays only the tracks it lacks: a kill loses one episode per
    worker, not the evaluation. The file is removed when the evaluation is complete. With PROGRESS_FILE the result
    also holds the evaluation's identity (evaluation_identity), so that evaluate.py can tell a finished one from
    another (None without)."""
    load_agent(Path(ckpt_dir), controller)  # one clear error before any worker starts
    start = time.perf_counter()
    identity, done = None, []
    if progress_file:  # (hashing the agent's files and the code is only needed to match a progress file or a result)
        identity = evaluation_identity(ckpt_dir, controller, episodes, seed, max_steps, backend, noise, device)
        done = _finished_episodes(progress_file, identity)

    def record(summaries: list[dict]) -> None:
        atomic_write(progress_file, lambda f: f.write(json.dumps({"identity": identity,
                                                                  "episodes": done + summaries}).encode()))

    finished = {s["seed"] for s in done}
    summaries = done + play_episodes(
        [(seed + i, None) for i in range(episodes) if seed + i not in finished], max_steps, workers, backend,
        "agent", {"ckpt_dir": str(ckpt_dir), "controller": controller, "noise": noise, "device": device},
        f"evaluate {controller}",
        progress, on_result=record if progress_file else None, ray_address=ray_address)
    if progress_file:
        Path(progress_file).unlink(missing_ok=True)
    returns = [s["return"] for s in sorted(summaries, key=lambda s: s["seed"])]
    return {"env_id": ENV_ID, "episodes": episodes, "seed": seed, "mean": float(np.mean(returns)),
            "std": float(np.std(returns)), "min": float(np.min(returns)), "max": float(np.max(returns)),
            "returns": returns, "controller": controller, "ckpt_dir": str(ckpt_dir), "env_backend": backend,
            "max_steps": max_steps, "noise": noise, "device": device,
            "frames": int(sum(s["frames"] for s in summaries)),
            "wall_seconds": round(time.perf_counter() - start, 1), "identity": identity}


def evaluation_identity(ckpt_dir: Path, controller: str, episodes: int, seed: int, max_steps: int, backend: str,
                        noise: float, device: str) -> dict:
    """What makes two evaluations the same one, and so give the same returns: the settings, the agent's files
    (sha256, by their path in CKPT_DIR) and the code that plays them (sha256 of this repo's modules: any change of
    code is taken to change the returns). The workers and the Ray cluster are not part of it."""
    code = hashlib.sha256()
    for module in sorted(Path(__file__).parent.glob("*.py")):
        code.update(module.name.encode() + b"\0" + module.read_bytes())
    return {"controller": controller, "seed": seed, "episodes": episodes, "max_steps": max_steps,
            "backend": backend, "noise": noise, "device": device,
            "files": {path.relative_to(ckpt_dir).as_posix(): file_sha256(path)
                      for path in agent_files_of(ckpt_dir, controller)},
            "code": code.hexdigest()}


def _finished_episodes(progress_file: Path, identity: dict) -> list[dict]:
    """The episodes an interrupted run of the same evaluation recorded ([] if none, or another evaluation's)."""
    try:
        saved = json.loads(Path(progress_file).read_bytes())
        if saved["identity"] != identity:
            return []
        episodes = [dict(s) for s in saved["episodes"]]
        if not all(isinstance(s["seed"], int) and isinstance(s["return"], float) and isinstance(s["frames"], int)
                   for s in episodes):
            raise ValueError("not a record of episodes")
        print(f"resuming the evaluation from {progress_file}: {len(episodes)} of {identity['episodes']} tracks done")
        return episodes
    except Exception:  # none yet, or damaged: play them all
        return []


def _update_bar(bar, frames: int, summaries: list[dict]) -> None:
    """Move the bar to FRAMES played so far and show the episodes finished and their mean return."""
    bar.update(frames - bar.n)
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
