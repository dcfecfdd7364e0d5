"""Controllers C: map the agent's features [z, h] to a CarRacing action.

- `ActorCritic`: the PPO agent, an MLP actor over the bounded action (a Beta per dimension, or a
  tanh-squashed Gaussian) and an MLP critic, with a running normalisation of [z, h] kept in its
  buffers (so the checkpoint carries it). Called on [z, h] it returns the deterministic action.
- `LinearController`: the original World Models controller, a = squash(W [z, h] + b), 867 parameters at
  the default sizes (3 x (32 + 256) + 3), evolved with CMA-ES. `population_actions` runs a whole
  CMA-ES population of such controllers as one tensor pass.
- `DreamCritic`: V([z, h]) for `train_cmaes_in_dream.py --critic`, which pays a CMA-ES dream cut after a few
  decisions the value of where it ends (fitted by `utils_rl.fit_critic`).

A controller checkpoint's config names its kind, so `build_controller` can rebuild it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class ControllerConfig:
    kind: str = "linear"
    """linear: the original controller (CMA-ES); actor_critic: the PPO agent"""
    obs_dim: int = 288
    """size of [z, h]"""
    hidden_dim: int = 256
    """actor_critic: width of the actor's and the critic's two hidden layers"""
    distribution: str = "beta"
    """actor_critic: beta or tanh_normal, the actor's distribution over the bounded action"""
    action_repeat: int = 1
    """frames each decision is held for (the features, h included, are updated once per decision)"""


ACTION_LOW, ACTION_HIGH = np.array([-1.0, 0.0, 0.0], np.float32), np.ones(3, np.float32)  # CarRacing's action box


def to_env_action(unit: torch.Tensor) -> torch.Tensor:
    """A unit action (..., 3) in [-1, 1] -> CarRacing's box, as in the original World Models: steer as is,
    gas (u + 1) / 2 in [0, 1], brake u clipped to [0, 1] (so half of the space means no brake)."""
    return torch.stack([unit[..., 0], (unit[..., 1] + 1) / 2, unit[..., 2].clamp(min=0)], -1)


def squash(raw: torch.Tensor) -> torch.Tensor:
    """Unbounded (..., 3) -> CarRacing's box through tanh (the linear controller's output)."""
    return to_env_action(torch.tanh(raw))


class RunningNorm(nn.Module):
    """Running mean and variance of the observations (buffers, so they travel in the state_dict).

    `update` is called by the trainer between PPO iterations, never inside one: the policy a rollout
    was sampled from and the one the update evaluates then see the same normalised inputs.
    """

    def __init__(self, dim: int, clip: float = 10.0):
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the statistics of a batch x (N, dim) (the parallel-variance formula)."""
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.var.copy_((self.var * self.count + batch_var * batch_count + delta ** 2 * self.count * batch_count / total)
                       / total)
        self.mean.add_(delta * batch_count / total)
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / torch.sqrt(self.var + 1e-8)).clamp(-self.clip, self.clip)


def _mlp(in_dim: int, hidden_dim: int, out_dim: int, out_gain: float) -> nn.Sequential:
    """Two tanh hidden layers, orthogonal init (the PPO implementation details), a small last layer."""
    layers = [nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, hidden_dim), nn.Tanh(),
              nn.Linear(hidden_dim, out_dim)]
    for layer in layers[::2]:
        nn.init.orthogonal_(layer.weight, out_gain if layer is layers[-1] else 2 ** 0.5)
        nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


class TanhNormal:
    """A diagonal Gaussian over raw x (..., 3), squashed to the unit action tanh(x) in [-1, 1].

    The sample kept for PPO is x itself (tanh saturates in float32, so x cannot be recovered from the
    action); `log_prob` is the density of the unit action, with the tanh Jacobian. Its entropy has no
    closed form: `entropy` is the Gaussian's, the usual stand-in for the bonus.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.normal = torch.distributions.Normal(mean, std)

    def sample(self) -> torch.Tensor:
        return self.normal.sample()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        # log(1 - tanh(x)^2) = 2 (log 2 - x - softplus(-2x)), stable for large |x|
        log_jacobian = 2 * (math.log(2) - x - nn.functional.softplus(-2 * x))
        return (self.normal.log_prob(x) - log_jacobian).sum(-1)

    def entropy(self) -> torch.Tensor:
        return self.normal.entropy().sum(-1)

    @staticmethod
    def unit_action(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)

    def mode(self) -> torch.Tensor:
        return torch.tanh(self.normal.mean)


class BetaUnit:
    """A Beta per action dimension over u in [0, 1], mapped to the unit action 2u - 1 in [-1, 1]; the sample
    kept for PPO is u. Bounded like the action itself, so no probability mass is lost at the edges."""

    def __init__(self, alpha: torch.Tensor, beta: torch.Tensor):
        self.beta = torch.distributions.Beta(alpha, beta)

    def sample(self) -> torch.Tensor:
        return self.beta.sample().clamp(1e-6, 1 - 1e-6)  # float32 Beta samples can hit 0 or 1 exactly

    def log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """Density of the unit action 2u - 1 (hence - log 2 per dimension)."""
        return (self.beta.log_prob(u) - math.log(2)).sum(-1)

    def entropy(self) -> torch.Tensor:
        return (self.beta.entropy() + math.log(2)).sum(-1)

    @staticmethod
    def unit_action(u: torch.Tensor) -> torch.Tensor:
        return 2 * u - 1

    def mode(self) -> torch.Tensor:
        return 2 * self.beta.mean - 1  # the mean: the mode is undefined for alpha or beta < 1


class ActorCritic(nn.Module):
    """The PPO agent on [z, h]: obs (B, obs_dim) -> policy over the unit action (B, 3), value (B,).

    `forward` is the deterministic controller every consumer calls (the distribution's mean, mapped
    to the env's box); training uses `policy`, `value` and `to_env_action(dist.unit_action(sample))`.
    """

    def __init__(self, config: ControllerConfig):
        super().__init__()
        if config.distribution not in ("beta", "tanh_normal"):
            raise ValueError(f"unknown actor distribution {config.distribution!r}: choose beta or tanh_normal")
        self.config = config
        self.obs_norm = RunningNorm(config.obs_dim)
        self.actor = _mlp(config.obs_dim, config.hidden_dim, 6 if config.distribution == "beta" else 3, 0.01)
        self.critic = _mlp(config.obs_dim, config.hidden_dim, 1, 1.0)
        if config.distribution == "tanh_normal":
            self.log_std = nn.Parameter(torch.full((3,), -0.5))

    def policy(self, obs: torch.Tensor) -> BetaUnit | TanhNormal:
        out = self.actor(self.obs_norm(obs)).float()  # (fp32 distributions where the networks run in bf16)
        if self.config.distribution == "beta":
            # alpha, beta > 1: a unimodal density; the near-zero last layer starts every dimension near Beta(2, 2)
            concentration = 1 + nn.functional.softplus(out + math.log(math.e - 1))
            return BetaUnit(concentration[..., :3], concentration[..., 3:])
        return TanhNormal(out, self.log_std.exp().expand_as(out))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(self.obs_norm(obs)).squeeze(-1).float()

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (B, obs_dim) -> deterministic env action (B, 3)."""
        return to_env_action(self.policy(obs).mode())


class DreamCritic(nn.Module):
    """V([z, h]) (B, obs_dim) -> (B,): the discounted dream return to go of the controllers whose dreams it was
    fitted on (a CMA-ES population), so that a dream cut after a few decisions is still paid for where it ends."""

    def __init__(self, obs_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.obs_norm = RunningNorm(obs_dim)
        self.net = _mlp(obs_dim, hidden_dim, 1, 1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.net(self.obs_norm(obs)).squeeze(-1)


class ScaledValue(nn.Module):
    """A dream-trained PPO agent's critic in the dream's own reward units: V([z, h]) (B, obs_dim) -> (B,), the
    agent's value times the std its rewards were divided by in training (RewardScaler), so that it can pay another
    controller's cut dream for where it ends. Fixed: nothing here trains it."""

    def __init__(self, agent: ActorCritic, reward_std: float):
        super().__init__()
        self.agent, self.reward_std = agent, reward_std

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.agent.value(obs) * self.reward_std


class LinearController(nn.Module):
    def __init__(self, config: ControllerConfig):
        super().__init__()
        self.config = config
        self.linear = nn.Linear(config.obs_dim, 3)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """obs (B, obs_dim) -> deterministic action (B, 3)."""
        return squash(self.linear(obs))

    @staticmethod
    def num_params(obs_dim: int) -> int:
        return 3 * obs_dim + 3

    def set_flat(self, flat: torch.Tensor) -> None:
        """Load a flat parameter vector laid out as [W (3 x obs_dim) row-major, b (3)]."""
        weight, bias = unflatten(flat, self.config.obs_dim)
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)


def unflatten(flat: torch.Tensor, obs_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., 3 * obs_dim + 3) -> W (..., 3, obs_dim), b (..., 3)."""
    weight = flat[..., :3 * obs_dim].unflatten(-1, (3, obs_dim))
    return weight, flat[..., 3 * obs_dim:]


def population_actions(flat: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    """P linear controllers at once: flat (P, n) params, obs (P, R, obs_dim) -> actions (P, R, 3)."""
    weight, bias = unflatten(flat, obs.shape[-1])
    return squash(torch.einsum("prd,pad->pra", obs, weight) + bias[:, None, :])


CONTROLLERS = {"linear": LinearController, "actor_critic": ActorCritic}


def build_controller(config: ControllerConfig) -> nn.Module:
    if config.kind not in CONTROLLERS:
        raise ValueError(f"unknown controller kind {config.kind!r}: choose one of {', '.join(CONTROLLERS)}")
    return CONTROLLERS[config.kind](config)
