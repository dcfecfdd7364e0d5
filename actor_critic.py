"""Controllers C: map the agent's features [z, h] to a CarRacing action.

- `LinearController`: the original World Models controller, a = squash(W [z, h] + b), 867 parameters at
  the default sizes (3 x (32 + 256) + 3), evolved with CMA-ES. `population_actions` runs a whole
  CMA-ES population of such controllers as one tensor pass.

A controller checkpoint's config names its kind, so `build_controller` can rebuild it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ControllerConfig:
    kind: str = "linear"
    """linear: the original controller (CMA-ES)"""
    obs_dim: int = 288
    """size of [z, h]"""


def squash(raw: torch.Tensor) -> torch.Tensor:
    """Unbounded (..., 3) -> CarRacing's box, as in the original: steer tanh in [-1, 1], gas
    (tanh + 1) / 2 in [0, 1], brake tanh clipped to [0, 1] (so half of the space means no brake)."""
    squashed = torch.tanh(raw)
    return torch.stack([squashed[..., 0], (squashed[..., 1] + 1) / 2, squashed[..., 2].clamp(min=0)], -1)


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


CONTROLLERS = {"linear": LinearController}


def build_controller(config: ControllerConfig) -> nn.Module:
    if config.kind not in CONTROLLERS:
        raise ValueError(f"unknown controller kind {config.kind!r}: choose one of {', '.join(CONTROLLERS)}")
    return CONTROLLERS[config.kind](config)
