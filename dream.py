"""The dream: CarRacing played inside a trained world model, batched as tensors.

- Counter-based noise (`counter_uniform`): a dream's randomness is a pure function of its own 64-bit
  seed and step, whatever batch it runs in.
- `BatchedDream`: B dreams stepped together, one world-model step per decision (the world model's
  `action_repeat` frames, the clock it was trained at), started from a bank of real episode starts or
  from given states.
- `DreamEnv` (`gymnasium.make("DreamCarRacing-v0", ckpt_dir=...)`): one dream as a Gymnasium env.
- `DreamFeatureEnvs`: whole dream episodes with same-step autoreset, for PPO.
- `ReplayStarts` and `ImaginedFeatureEnvs`: imagination started from the states of replayed real
  sequences, `horizon` decisions long, for PPO whose critic bootstraps the rest.
- `dream_return`: the one dream-return loop (deterministic scores, CMA-ES fitness).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import gymnasium as gym
import numpy as np
import torch

import cluster
from actor_critic import ACTION_HIGH, ACTION_LOW, population_actions
from agent import load_vae_and_world_model, load_world_model
from episodes import encode_episodes, list_episodes, load_latent_episode
from utils import Precision, UserError, autocast, file_sha256

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
    seeds see the same noise (common random numbers for CMA-ES). Both 32-bit halves of the int64 seed
    enter the key, so runs whose seeds differ only above bit 31 (seed * 2**32 + i) draw other streams.
    """
    seed_key = _hash32(_hash32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    key = _hash32(seed_key ^ (steps & _MASK32))
    bits = _hash32(key.unsqueeze(-1) ^ _hash32(torch.arange(count, device=seeds.device) + 0x9E3779B9))
    return ((bits.double() + 0.5) / 2.0**32).float()


def box_muller(uniform):
    """Standard normal noise (B, n) from uniform noise (B, 2n)."""
    n = uniform.shape[-1] // 2
    return torch.sqrt(-2 * torch.log(uniform[:, :n])) * torch.cos(2 * torch.pi * uniform[:, n:2 * n])


def run_seeds(run_seed: int, first: int, count: int, device=None) -> torch.Tensor:
    """The dream seeds first .. first + count - 1 of a run: run_seed * 2**32 + index, (count,) int64.
    Every dream of every stage draws its seeds here, so two runs with other --seed never share a dream."""
    return torch.arange(first, first + count, device=device) + run_seed * 2**32


EVAL_DREAM_SEED = 2**62  # dreams for deterministic scores: seeds 2**62 + i, apart from every run's training seeds


class BatchedDream:
    """B CarRacing dreams inside a world model, stepped together as tensors.

    Observation: [z, h] (B, latent + hidden), the controller's input. A dream starts from the latent
    of a real episode start (a bank stored in the world-model checkpoint), drawn with the env's seed,
    or from a given (z, recurrent state). Each step is one decision: it feeds [z, action] to the model
    (which was trained on decisions held for its `action_repeat` frames), samples the next z with the
    temperature, and returns the predicted reward of those frames and done (probability > 0.5);
    `done_prob` keeps the probability. It truncates at `max_steps` frames (ceil(max_steps / action
    repeat) decisions), the real env's limit. Finished envs are restarted by the caller with `reset`.
    `precision` bf16 steps the model's cell and heads in bf16 mixed precision (utils.autocast; the state, z and
    outputs stay fp32): faster imagination on a CPU with AVX-512 BF16, a slightly different dream.
    """

    def __init__(self, world_model, start_mu, start_logvar, num_envs: int, temperature: float = 1.0,
                 max_steps: int = 1000, device="cpu", precision: Precision = "fp32"):
        self.model, self.device, self.precision = world_model, torch.device(device), precision
        self.start_mu, self.start_logvar = start_mu.to(self.device), start_logvar.to(self.device)
        self.num_envs, self.temperature = num_envs, temperature
        self.action_repeat = world_model.config.action_repeat
        self.max_steps = math.ceil(max_steps / self.action_repeat)  # decisions
        self.latent_dim = world_model.config.latent_dim
        self.obs_dim = world_model.controller_input_dim
        self.seeds = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.t = torch.zeros(num_envs, dtype=torch.int64, device=self.device)
        self.z = torch.zeros(num_envs, self.latent_dim, device=self.device)
        self.state = world_model.initial_state(num_envs, self.device)
        self.done_prob = torch.zeros(num_envs, device=self.device)
        self.action_low = torch.from_numpy(ACTION_LOW).to(self.device)
        self.action_high = torch.from_numpy(ACTION_HIGH).to(self.device)

    def observation(self):
        return self.model.controller_input(self.z, self.state)

    def reset(self, seeds, mask=None, z=None, state=None):
        """(Re)start the envs where `mask` (all if None) with the given seeds (B,); returns the observation.
        The start latent is drawn from the bank with the seed, or given as `z` (B, latent); the recurrent
        state is the model's initial one, or given as `state` (B, state_size)."""
        seeds = torch.as_tensor(seeds, dtype=torch.int64, device=self.device)
        mask = torch.ones(self.num_envs, dtype=torch.bool, device=self.device) if mask is None else mask
        if z is None:
            start = torch.full_like(seeds, -1)  # step -1: the draws that pick and sample the start latent
            uniform = counter_uniform(seeds, start, 1 + 2 * self.latent_dim)
            pick = (uniform[:, 0] * len(self.start_mu)).long().clamp(max=len(self.start_mu) - 1)
            z = self.start_mu[pick]
            if self.model.config.latent == "sample":  # a model that learnt from sampled z starts from one
                z = z + torch.exp(0.5 * self.start_logvar[pick]) * box_muller(uniform[:, 1:])
        if state is None:
            state = self.model.initial_state(self.num_envs, self.device)
        self.seeds = torch.where(mask, seeds, self.seeds)
        self.t = torch.where(mask, torch.zeros_like(self.t), self.t)
        self.z = torch.where(mask[:, None], z, self.z)
        self.state = torch.where(mask[:, None], state, self.state)
        return self.observation()

    def step(self, action):
        """action (B, 3) -> observation (B, obs_dim), reward (B,), terminated (B,), truncated (B,)."""
        with torch.no_grad():
            action = torch.as_tensor(action, dtype=torch.float32, device=self.device)
            action = torch.maximum(torch.minimum(action, self.action_high), self.action_low)
            with autocast(self.device, self.precision):
                pred, self.state = self.model.step(self.z, action, self.state)
            uniform = counter_uniform(self.seeds, self.t, 3 * self.latent_dim)  # component picks, then Gaussian noise
            self.z = self.model.sample_next(pred, self.temperature, uniform[:, :self.latent_dim],
                                            box_muller(uniform[:, self.latent_dim:]))
            self.t += 1
            self.done_prob = torch.sigmoid(pred.done_logit)
            terminated = pred.done_logit > 0  # probability > 0.5
            truncated = (self.t >= self.max_steps) & ~terminated
            return self.observation(), pred.reward, terminated, truncated


@torch.no_grad()
def dream_return(dream: BatchedDream, act: Callable[[torch.Tensor], torch.Tensor], seeds: torch.Tensor,
                 z: torch.Tensor | None = None, state: torch.Tensor | None = None, gamma: float = 1.0,
                 critic: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 trajectory: dict | None = None) -> torch.Tensor:
    """The return of each of the B dreams (one per seed, from the bank or from z/state), played to its end
    by `act` (observations (B, obs_dim) -> actions (B, 3)): (B,). The one dream-return loop (the
    deterministic dream scores, CMA-ES fitness). Rewards are discounted by GAMMA; a CRITIC adds
    gamma**t * critic(obs) where a dream is cut (truncated, not terminated) after t decisions. A TRAJECTORY dict
    receives every step: obs (T + 1, B, obs_dim), reward, terminated and alive (T, B: the dream still ran)."""
    obs = dream.reset(seeds, z=z, state=state)
    returns = torch.zeros(dream.num_envs, device=obs.device)
    alive = torch.ones(dream.num_envs, dtype=torch.bool, device=obs.device)
    discount, steps = 1.0, {"obs": [obs], "reward": [], "terminated": [], "alive": []}
    while alive.any():
        obs, reward, terminated, truncated = dream.step(act(obs))
        returns += discount * reward * alive
        discount *= gamma
        cut = alive & truncated & ~terminated
        if critic is not None and cut.any():  # (replayed dreams are all cut at their last step: one critic pass)
            returns += discount * torch.where(cut, critic(obs), 0.0)
        if trajectory is not None:
            for name, value in zip(steps, (obs, reward, terminated, alive.clone())):
                steps[name].append(value)
        alive &= ~(terminated | truncated)
    if trajectory is not None:
        trajectory.update({name: torch.stack(values) for name, values in steps.items()})
    return returns


@torch.no_grad()
def dream_fitness(dream: BatchedDream, solutions: torch.Tensor, rollouts: int, seeds: torch.Tensor,
                  z: torch.Tensor | None = None, state: torch.Tensor | None = None, gamma: float = 1.0,
                  critic: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  trajectory: dict | None = None) -> torch.Tensor:
    """Mean dream return of each candidate: solutions (P, n), seeds (P * rollouts,) -> (P,). The dreams start
    from the bank, or from the given z (P * rollouts, latent) and state (P * rollouts, state_size); GAMMA,
    CRITIC and TRAJECTORY as in `dream_return`."""
    popsize = solutions.shape[0]

    def act(obs: torch.Tensor) -> torch.Tensor:
        return population_actions(solutions, obs.view(popsize, rollouts, -1)).view(popsize * rollouts, 3)

    returns = dream_return(dream, act, seeds, z, state, gamma, critic, trajectory)
    return returns.view(popsize, rollouts).mean(1)


_cluster_worker: dict = {}  # per Ray worker process: the world model of the current population_fitness_on_cluster


def _fitness_task(shared: dict, chunk: tuple[int, int, np.ndarray]) -> tuple[int, np.ndarray]:
    """A Ray task (cluster_map): dream_fitness of a slice of one group's candidates, FIRST.. of the generation, on
    that group's seeds and starts (the same for every candidate of the group, as on one machine)."""
    first, group, solutions = chunk
    if _cluster_worker.get("key") != shared["key"]:
        cluster.worker_threads()
        world_model, checkpoint = load_world_model(cluster.local_copy(shared["files"]) / "world_model.pt")
        _cluster_worker.update(key=shared["key"], model=world_model, bank=checkpoint["start_bank"])
    popsize, bank, rollouts = len(solutions), _cluster_worker["bank"], shared["rollouts"]
    dream = BatchedDream(_cluster_worker["model"], bank["mu"], bank["logvar"], popsize * rollouts,
                         shared["temperature"], shared["max_frames"])
    ours = slice(group * rollouts, (group + 1) * rollouts)
    z, state = ((shared["z"][ours].repeat(popsize, 1), shared["state"][ours].repeat(popsize, 1))
                if shared["z"] is not None else (None, None))
    fitness = dream_fitness(dream, torch.as_tensor(solutions), rollouts, shared["seeds"][ours].repeat(popsize), z,
                            state)
    return first, fitness.numpy()


def population_fitness_on_cluster(address: str, world_model_path: Path, solutions: np.ndarray, rollouts: int,
                                  seeds: torch.Tensor, temperature: float, max_frames: int,
                                  z: torch.Tensor | None = None, state: torch.Tensor | None = None,
                                  groups: int = 1) -> np.ndarray:
    """dream_fitness of CMA-ES populations spread over a Ray cluster: slices of candidates over the CPUs, the world
    model file shipped once per call (a generation). The G = GROUPS populations (G independent evolutions) are
    stacked: solutions (G * P, n), group g's candidates g * P .. (g + 1) * P - 1 all dreaming on its ROLLOUTS seeds
    seeds[g * R:(g + 1) * R] and starts z, state (G * R, ...). -> fitness (G * P,), as dream_fitness gives for
    each group."""
    if len(solutions) % groups or len(seeds) != groups * rollouts:
        raise ValueError(f"{len(solutions)} candidates and {len(seeds)} seeds do not make {groups} groups "
                         f"of {rollouts} rollouts")
    cluster.connect(address)
    popsize = len(solutions) // groups
    files = cluster.ship_files([world_model_path])
    shared = {"key": cluster.content_key(files), "files": files, "rollouts": rollouts, "seeds": seeds.cpu(),
              "temperature": temperature, "max_frames": max_frames,
              "z": None if z is None else z.cpu(), "state": None if state is None else state.cpu()}
    chunks = []  # one slice per CPU, cut again where it crosses from one group into the next
    for part in np.array_split(np.arange(len(solutions)), min(len(solutions), cluster.cluster_cpus())):
        for group in np.unique(part // popsize):
            ours = part[part // popsize == group]
            chunks.append((int(ours[0]), int(group), np.asarray(solutions[ours], np.float32)))
    fitness = np.zeros(len(solutions), np.float32)
    for _, (first, values) in cluster.cluster_map(address, _fitness_task, shared, chunks):
        fitness[first:first + len(values)] = values
    return fitness


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
        return self.vae.decode_frames(self.dream.z)[0]


gym.register("DreamCarRacing-v0", entry_point=DreamEnv)


class DreamFeatureEnvs:
    """A BatchedDream with same-step autoreset, the interface of RealFeatureEnvs: each new dream episode
    draws the next seed of this run's own sequence (run_seeds(seed, episode count))."""

    kind = "dream"

    horizon = 0  # decisions before a dream is cut (0: only at its end)

    def __init__(self, dream: BatchedDream, seed: int = 0):
        self.dream, self.num_envs, self.obs_dim = dream, dream.num_envs, dream.obs_dim
        self.action_repeat = dream.action_repeat
        self.seed, self.episodes = seed, 0

    def _seeds(self) -> torch.Tensor:
        seeds = run_seeds(self.seed, self.episodes, self.num_envs, self.dream.device)
        self.episodes += self.num_envs
        return seeds

    def skip(self, restarts: int) -> None:
        """Move the seed sequence past `restarts` batches of restarts (a resumed run draws new dreams)."""
        self.episodes += restarts * self.num_envs

    def _restart(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(Re)start the dreams where `mask` (all if None) on the next seeds; returns the observation."""
        return self.dream.reset(self._seeds(), mask)

    def reset(self) -> torch.Tensor:
        return self._restart()

    def step(self, actions: torch.Tensor):
        obs, reward, terminated, truncated = self.dream.step(actions)
        if self.horizon:
            truncated = truncated | ((self.dream.t >= self.horizon) & ~terminated)
        done = terminated | truncated
        final_obs = obs.clone()
        if done.any():
            obs = self._restart(done)
        return obs, reward, terminated, truncated, final_obs

    def close(self) -> None:
        pass


class ReplayStarts:
    """Every state of a set of real sequences, as the agent saw it: z_t (the VAE's mean of decision t's
    frame) and the world model's recurrent state after (z_0, a_0) .. (z_{t-1}, a_{t-1}).

    episodes: dicts with `mu` (T, latent), `action` (T, 3) and `reward` (T,) at the world model's clock. The
    states are computed once (one batched cell pass over the padded episodes) and kept flat: z (N, latent)
    and state (N, state_size) over the N real decisions (time-major; `episode_index` and `time_index` say where
    each comes from). `sample(uniform)` picks starts from uniform noise,
    each state with probability proportional to its weight: CRITICAL_WEIGHT for the states around a loss
    of the road (`critical_states`), 1 for the others (so > 1 practises the moments that decide a track).
    """

    def __init__(self, world_model, episodes: list[dict], device="cpu", batch: int = 256,
                 critical_weight: float = 1.0):
        if not critical_weight > 0:
            raise ValueError(f"the critical states' weight must be positive, not {critical_weight}")
        zs, states, weights, where = [], [], [], []
        with torch.no_grad():
            for first in range(0, len(episodes), batch):
                group = episodes[first:first + batch]
                length = max(len(ep["mu"]) for ep in group)
                mu = torch.zeros(len(group), length, world_model.config.latent_dim, device=device)
                action = torch.zeros(len(group), length, world_model.config.action_dim, device=device)
                weight = torch.ones(len(group), length, dtype=torch.float64, device=device)
                valid = torch.zeros(len(group), length, dtype=torch.bool, device=device)
                for row, ep in enumerate(group):
                    steps = len(ep["mu"])
                    mu[row, :steps] = torch.as_tensor(ep["mu"], device=device)
                    action[row, :steps] = torch.as_tensor(ep["action"], device=device)
                    if critical_weight != 1:
                        critical = torch.from_numpy(critical_states(np.asarray(ep["reward"]))).to(device)
                        weight[row, :steps] = torch.where(critical, critical_weight, 1.0)
                    valid[row, :steps] = True
                state = world_model.initial_state(len(group), device)
                for t in range(length):
                    zs.append(mu[valid[:, t], t]), states.append(state[valid[:, t]])
                    weights.append(weight[valid[:, t], t])
                    rows = torch.nonzero(valid[:, t]).squeeze(1).cpu()
                    where.append(torch.stack([rows + first, torch.full_like(rows, t)], 1))
                    _, state = world_model.step(mu[:, t], action[:, t], state)
        if not zs:
            raise ValueError("ReplayStarts needs at least one episode with one step")
        self.z, self.state, weights = torch.cat(zs), torch.cat(states), torch.cat(weights)
        self.episode_index, self.time_index = torch.cat(where).T  # (N,) each: state i is decision t of episode e
        self.critical_share = float((weights != 1).double().mean())
        cumulative = weights.cumsum(0)
        self.cdf = cumulative / cumulative[-1]  # (N,): state i is picked for uniform in [cdf[i - 1], cdf[i])

    def __len__(self) -> int:
        return len(self.z)

    def sample(self, uniform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """uniform (B,) in [0, 1) -> start z (B, latent) and state (B, state_size), drawn by weight."""
        index = torch.searchsorted(self.cdf, uniform.to(self.cdf), right=True).clamp(max=len(self.z) - 1)
        return self.z[index], self.state[index]


def road_lost(reward: np.ndarray, window: int = 10) -> np.ndarray:
    """(T,) bool: the car is lost at t when decisions t .. t + WINDOW - 1 earn nothing together (no new tile, only
    the time penalty, or worse); the tail shorter than WINDOW is never called lost."""
    steps = len(reward)
    cumulative = np.concatenate([[0.0], np.cumsum(reward, dtype=np.float64)])
    starts = np.arange(max(0, steps - window + 1))
    lost = np.zeros(steps, bool)
    lost[starts] = cumulative[starts + window] - cumulative[starts] <= 0
    return lost


@torch.no_grad()
def road_loss_rates(world_model, controller, episodes: list[dict], horizon: int = 30, window: int = 10,
                    temperature: float = 1.0, seed: int = 0, device="cpu") -> dict:
    """How often the road is lost soon after a decision on it, in real episodes and in the dream of the same
    controller: the dream's calibration on the moments that decide a track.

    episodes: latent episodes (`mu`, `action`, `reward`) at the world model's clock, driven by CONTROLLER (a
    controller of WORLD_MODEL's features). From every decision t that earns a new tile and has HORIZON + WINDOW - 1
    real decisions after it: does a loss of the road (`road_lost`) begin within HORIZON decisions, in the episode,
    and in a dream started from that state (z_t, h after the real past) with CONTROLLER driving? A dream that loses
    the road less often than the real env teaches its controller a world where the road is rarely lost.
    Returns {"states", "real", "dream"} (the two rates; nan without such a decision).
    """
    starts = ReplayStarts(world_model, episodes, device)
    span = horizon + window - 1
    length = max(len(ep["reward"]) for ep in episodes)
    keep, real_lost = np.zeros((2, len(episodes), length), bool)  # per (episode, decision), padded
    for row, ep in enumerate(episodes):
        reward = np.asarray(ep["reward"])
        lost = road_lost(reward, window)
        real_lost[row, :len(reward)] = [lost[t:t + horizon].any() for t in range(len(reward))]
        keep[row, :len(reward)] = (reward > 0) & (np.arange(len(reward)) + span <= len(reward))
    where = (starts.episode_index.numpy(), starts.time_index.numpy())  # the flat states' (episode, decision)
    index = torch.from_numpy(np.flatnonzero(keep[where]))
    if len(index) == 0:
        return {"states": 0, "real": math.nan, "dream": math.nan}
    real = torch.from_numpy(real_lost[where][index.numpy()])
    dream = BatchedDream(world_model, starts.z[:1], torch.zeros_like(starts.z[:1]), len(index), temperature, 10**9,
                         device)
    obs = dream.reset(run_seeds(seed, 0, len(index), device), z=starts.z[index].to(device),
                      state=starts.state[index].to(device))
    rewards, ended = [], torch.zeros(len(index), dtype=torch.bool, device=device)
    for _ in range(span):
        obs, reward, terminated, _ = dream.step(controller(obs))
        rewards.append(torch.where(ended, 1.0, reward))  # after a predicted end of the lap nothing is lost
        ended |= terminated
    cumulative = torch.nn.functional.pad(torch.stack(rewards, 1).double().cumsum(1), (1, 0))  # (N, span + 1)
    dream_lost = (cumulative[:, window:window + horizon] - cumulative[:, :horizon] <= 0).any(1)
    return {"states": len(index), "real": float(real.float().mean()), "dream": float(dream_lost.float().mean())}


def critical_states(reward: np.ndarray, window: int = 10, before: int = 20, after: int = 10) -> np.ndarray:
    """The decisions around each loss of the road in one real episode: (T,) bool.

    reward (T,): the reward of each decision. The car is lost at t when the next WINDOW decisions earn
    nothing (no new tile, only the time penalty, or worse); a loss starts where it was not lost the decision
    before. The BEFORE decisions that led to each start (a hairpin taken too fast, a spin) and the AFTER
    decisions that follow it (getting back) are critical; the tail shorter than WINDOW is never called lost.
    """
    steps = len(reward)
    lost = road_lost(reward, window)
    onsets = np.flatnonzero(lost & ~np.concatenate([[True], lost[:-1]]))
    critical = np.zeros(steps, bool)
    for onset in onsets:
        critical[max(0, onset - before):onset + after] = True
    return critical


def load_replay(data_dir: Path, vae, vae_path: Path, action_repeat: int, device="cpu", paths=None,
                progress: bool = True) -> list[dict]:
    """The real episodes of DATA_DIR (or only its episode files PATHS) at `action_repeat` as latents (mu, action,
    ...), encoded by the VAE once and cached (the cache train_world_model.py fills); none is a UserError."""
    vae_sha256 = file_sha256(vae_path)
    cache = encode_episodes(vae, vae_sha256, list_episodes(data_dir) if paths is None else paths, data_dir, device,
                            progress=progress)
    episodes = [episode for episode in (load_latent_episode(path, vae_sha256) for path in cache.values())
                if episode is not None and int(episode["action_repeat"]) == action_repeat]
    if not episodes:
        raise UserError(f"no episode at action repeat {action_repeat} in {data_dir}/rollouts/ to start the "
                        f"imagination from: run collect_data.py --data-dir {data_dir} (or use --no-replay)")
    return episodes


class ImaginedFeatureEnvs(DreamFeatureEnvs):
    """Imagination for PPO, with the RealFeatureEnvs interface: B dreams start from states of replayed real
    sequences (ReplayStarts), run `horizon` decisions, and are then truncated and restarted from new
    replayed states (same-step autoreset). The PPO loop bootstraps each truncation with its critic, so
    the critic carries the return past the horizon: short imagined stretches, anchored in real states,
    leave the policy little room to exploit the world model's long-run errors.

    The restart after each ended stretch draws the next seed of this run's sequence (run_seeds), which
    picks the replayed state and drives the dream's noise.
    """

    def __init__(self, dream: BatchedDream, starts: ReplayStarts, horizon: int, seed: int = 0):
        if horizon < 1:
            raise ValueError("the imagination horizon must be at least 1 decision")
        super().__init__(dream, seed)
        self.starts, self.horizon = starts, horizon

    def _restart(self, mask: torch.Tensor | None = None) -> torch.Tensor:
        seeds = self._seeds()
        pick = counter_uniform(seeds, torch.full_like(seeds, -2), 1)[:, 0]  # step -2: the replay pick
        z, state = self.starts.sample(pick)
        return self.dream.reset(seeds, mask, z=z.to(self.dream.device), state=state.to(self.dream.device))
