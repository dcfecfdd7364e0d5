"""The real environment: `make_env` (the one place an env is built: the fast pixel-exact CarRacing-v3,
the stock one, or EnvPool's clone), the wrappers (decision clock, no-progress stop), the process-backed
vector env, and `RealFeatureEnvs`, the real envs seen through the agent's features for PPO.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from actor_critic import ACTION_HIGH, ACTION_LOW
from agent import FeatureTracker, load_member, load_vae_and_world_model
from fast_car_racing import make_fast_env
from utils import FRAME_SIZE, UserError, checkpoint_identity, preprocess_frame

ENV_ID = "CarRacing-v3"


BACKENDS = ("fast", "gymnasium", "envpool")


ENVPOOL_INSTALL = "pip install envpool==1.2.5"




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


def hold_actions(env: gym.Env, action_repeat: int) -> gym.Env:
    """`env` whose step holds the action for `action_repeat` frames (the decision clock), or env itself at 1."""
    return ActionRepeat(env, action_repeat) if action_repeat > 1 else env


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


class LossRestarts(gym.Wrapper):
    """Training only: start a share of the episodes shortly before a place where an earlier one lost the road.

    The PPO controller's disasters are rare moments (a hairpin taken too fast, then the road never found again)
    that ordinary episodes practise rarely; the dream loop's controller stopped failing once its imagination
    started around such moments more often. CarRacing is deterministic given the track seed and the actions
    (bit for bit, tests/test_ppo.py), so a moment is kept as (seed, the actions up to it) and restored by
    replaying them without drawing (FastCarRacing's physics are ~0.05 ms a frame). Every episode is reset on an
    explicit seed drawn from this wrapper's own stream (seeded by the first seeded reset). An episode that ends
    without finishing its lap (the no-progress stop inside, or the playfield left) lost the road at its last
    new tile; a start 10-40 decisions (40-160 frames) before that, past the zoomed-out first 60 frames, joins
    the last `keep` kept by this env. Then each reset, with probability `share`, restarts at one of them. The
    agent's memory h starts there from zero, and the logged training return of a restarted episode counts
    from the restart.
    """

    def __init__(self, env: gym.Env, share: float, keep: int = 32, before: tuple[int, int] = (40, 160),
                 first_frame: int = 60):
        super().__init__(env)
        self.share, self.keep, self.before, self.first_frame = share, keep, before, first_frame
        self.rng = np.random.default_rng(0)
        self.moments: list[tuple[int, np.ndarray]] = []  # (track seed, per-frame actions to replay)
        self.seed, self.actions, self.last_tile, self.restarted = 0, [], 0, False

    def reset(self, *, seed: int | None = None, options=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.restarted = bool(self.moments) and self.rng.random() < self.share
        if not self.restarted:
            self.seed, self.actions, self.last_tile = int(self.rng.integers(2**31)), [], 0
            return self.env.reset(seed=self.seed, options=options)
        self.seed, prefix = self.moments[self.rng.integers(len(self.moments))]
        obs, info = self.env.reset(seed=self.seed, options=options)
        base = self.env.unwrapped
        can_skip = hasattr(base, "draw_state")
        for action in prefix:
            if can_skip:
                base.draw_state = False
            self.env.step(action)
        if can_skip:
            base.draw_state = True
            base.state = base._render("state_pixels")
        obs = base.state
        self.actions, self.last_tile = list(prefix), len(prefix)
        return obs, info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.actions.append(np.asarray(action, np.float32))
        if reward > 0:
            self.last_tile = len(self.actions)
        if terminated and not info.get("lap_finished", False):
            start = self.last_tile - int(self.rng.integers(*self.before))
            if start >= self.first_frame:
                self.moments = (self.moments + [(self.seed, np.stack(self.actions[:start]))])[-self.keep:]
        return obs, reward, terminated, truncated, info


class OffRoadPenalty(gym.Wrapper):
    """Subtract `penalty` from each frame's reward while no wheel touches the road (training only).

    The PPO controller's disasters are bends taken too fast: the car slides onto the grass and rarely finds the
    road again. Only the no-progress stop and the lost future returns punish that, both rare and late; a penalty
    on every frame off the road makes each slide wide a signal. A wheel's `tiles` are the road tiles it touches
    (gymnasium's FrictionDetector), so the stock and the fast env both have them.
    """

    def __init__(self, env: gym.Env, penalty: float):
        super().__init__(env)
        self.penalty = penalty

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        car = self.env.unwrapped.car
        if car is not None and not any(wheel.tiles for wheel in car.wheels):
            reward = float(reward) - self.penalty
        return obs, reward, terminated, truncated, info


def _die_with_parent() -> None:
    """Linux: have the kernel kill this worker when its parent dies, instead of it finishing an episode
    and then failing on the closed result pipe (a killed run then leaves no stray process)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass(frozen=True)
class TrainingShaping:
    """What only training episodes get (every field's zero is off); evaluation and checks play the plain env."""

    no_progress_frames: int = 0
    """end an episode after this many frames in a row without a new tile (NoProgressStop)"""
    off_road_penalty: float = 0.0
    """subtract this from each frame's reward while no wheel is on the road (OffRoadPenalty)"""
    loss_restarts: float = 0.0
    """share of episodes restarted before an earlier loss of the road (LossRestarts)"""

    def wrap(self, env: gym.Env, backend: str) -> gym.Env:
        """ENV with these wrappers, OffRoadPenalty outside the others (they must see the env's own reward)."""
        if self.no_progress_frames:
            env = NoProgressStop(env, self.no_progress_frames)
        if (self.loss_restarts or self.off_road_penalty) and not hasattr(env.unwrapped, "car"):
            raise UserError(f"--loss-restarts and --off-road-penalty need the car's physics: use --env-backend fast "
                            f"or gymnasium, not {backend}")
        if self.loss_restarts:
            env = LossRestarts(env, self.loss_restarts)
        if self.off_road_penalty:
            env = OffRoadPenalty(env, self.off_road_penalty)
        return env


class _PreprocessedEnv(gym.ObservationWrapper):
    """make_env(backend) whose observation is the preprocessed 64x64 frame (done in the env's own
    worker process, so only 12 KB per step cross the pipe), with the training-only SHAPING and ActionRepeat."""

    def __init__(self, backend: str, max_steps: int, action_repeat: int = 1,
                 shaping: TrainingShaping = TrainingShaping()):
        super().__init__(hold_actions(shaping.wrap(make_env(backend, max_steps), backend), action_repeat))
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
                 action_repeat: int = 1, shaping: TrainingShaping = TrainingShaping()):
        shaping.wrap(make_env(backend, max_steps), backend).close()  # bad settings fail here, in one line
        env_kwargs = {"backend": backend, "max_steps": max_steps, "action_repeat": action_repeat, "shaping": shaping}
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
    the world model's action repeat k frames, and h steps once per decision, as `agent.Agent` does.

    Same-step autoreset: the step that ends an episode returns the next episode's first observation,
    and that step's reward and flags; `final_obs` then holds, for the envs that ended, the features of
    the episode's last frame (to bootstrap a truncated episode's value). Torch tensors in and out.

    With PARTNER (a trained controller_*.pt, its world model the world_model.pt beside it, both seen through
    CKPT_DIR's VAE) the action taken is the mean of the given action and the partner's deterministic one, as
    `Agent` plays a two-member ensemble: the controller being trained learns its part of that pair, with the
    partner, frozen, as part of the env. Both memories h remember the action taken; `partner_identity` names the
    partner's files (None without one).
    """

    kind = "real"

    def __init__(self, ckpt_dir: Path, num_envs: int, backend: str = "fast", max_steps: int = 1000, seed: int = 0,
                 device="cpu", workers: int = 2, shaping: TrainingShaping = TrainingShaping(),
                 partner: Path | None = None):
        vae, world_model, _ = load_vae_and_world_model(Path(ckpt_dir), device)
        action_repeat = world_model.config.action_repeat
        self.num_envs, self.seed, self.device, self.action_repeat = num_envs, seed, device, action_repeat
        self.obs_dim = world_model.controller_input_dim
        self.features = FeatureTracker(vae, world_model, num_envs, device)
        self.partner, self.partner_identity = None, None  # (FeatureTracker, controller), the files' identities
        if partner is not None:
            partner_world_model_path = Path(partner).parent / "world_model.pt"
            partner_world_model, controller, config = load_member(Path(partner), partner_world_model_path,
                                                                  Path(ckpt_dir), device, "its training stage")
            if config.action_repeat != action_repeat:
                raise UserError(f"the partner {partner} decides every {config.action_repeat} frames, the world model "
                                f"of {ckpt_dir} every {action_repeat}: an ensemble's members share one clock")
            self.partner = (FeatureTracker(vae, partner_world_model, num_envs, device), controller)
            self.partner_identity = {"controller": checkpoint_identity(Path(partner)),
                                     "world_model": checkpoint_identity(partner_world_model_path)}
        self.envs = ProcessVectorEnv(num_envs, backend, max_steps, workers, action_repeat, shaping)

    def skip(self, decisions: int) -> None:
        """Start past what DECISIONS steps of each env drew (a resumed run plays other tracks than it had)."""
        self.seed += decisions

    def reset(self) -> torch.Tensor:
        frames = self.envs.reset(self.seed)
        self.features.reset()
        if self.partner is not None:
            self.partner[0].reset()
        return self._observe(frames)

    def _observe(self, frames: np.ndarray) -> torch.Tensor:
        """[z, h] of the frames for the controller being trained (the partner's own [z, h] kept for its action)."""
        obs = self.features.observe(frames)
        if self.partner is not None:
            self.partner_obs = self.partner[0].observe(frames, self.features.z)  # (one VAE: z encoded once)
        return obs

    def step(self, actions: torch.Tensor):
        """actions (N, 3) -> obs (N, D), reward (N,), terminated (N,), truncated (N,), final_obs (N, D)."""
        if self.partner is not None:  # the pair's action: the mean of the two (make_ensemble.py's equal weights)
            with torch.no_grad():
                actions = (actions.to(self.device) + self.partner[1](self.partner_obs)) / 2
        frames, reward, terminated, truncated, last_frames = self.envs.step(actions.cpu().numpy())
        self.features.remember(actions)
        done = torch.from_numpy(terminated | truncated)
        final_obs = None
        if done.any():  # the features of each ended episode's last frame, with the memory of its last step
            final_obs = self.features.world_model.controller_input(self.features.encode(last_frames),
                                                                   self.features.state)
        self.features.reset(done)
        if self.partner is not None:
            self.partner[0].remember(actions)
            self.partner[0].reset(done)
        obs = self._observe(frames)
        final_obs = obs if final_obs is None else torch.where(done[:, None].to(obs.device), final_obs, obs)
        return (obs, torch.as_tensor(reward, dtype=torch.float32), torch.from_numpy(terminated),
                torch.from_numpy(truncated), final_obs)

    def close(self) -> None:
        self.envs.close()
