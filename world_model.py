"""The memory model M: a recurrent world model over VAE latents.

Given z_t (the VAE latent of frame t) and the action a_t, it predicts the distribution of z_{t+1},
the reward r_t earned by a_t, and whether the episode terminated after a_t. Two models share one
interface and one mixture-density head:

- `WorldModelGRU`: a GRU; next z is a diagonal Gaussian (a one-component mixture).
- `MDNRNN`: the original memory model, an LSTM with a mixture of `num_mixtures` Gaussians per
  latent dimension (Ha & Schmidhuber, 2018), sampled with a temperature.

The interface: `initial_state(batch)`, `step(z, action, state)` for acting and dreaming (one time
step, through the fused cell on the same weights), `forward(z, action, state)` for training (whole
sequences), `features(state)` (the h a controller sees), `loss(...)` and `sample_next(...)`.
A recurrent state is one tensor (B, state_size): h for the GRU, [h, c] for the LSTM, so callers
can store, index and reset it without knowing the cell.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

LOG_SIGMA_MIN, LOG_SIGMA_MAX = -7.0, 3.0


@dataclass
class WorldModelConfig:
    arch: str = "mdn"
    """gru: GRU + one Gaussian per z dim; mdn: LSTM + a mixture of Gaussians per z dim"""
    latent_dim: int = 32
    action_dim: int = 3
    hidden_dim: int = 256
    num_mixtures: int = 5
    """Gaussians per z dim (the GRU model always uses 1)"""
    action_repeat: int = 1
    """frames per step: the model steps once per decision held for this many frames (its clock); 1 in
    checkpoints made before the clock was recorded"""
    latent: str = "sample"
    """the z it learnt from: sample (z drawn from the VAE's N(mu, sigma), the original; checkpoints made before
    this was recorded) or mean (the VAE's mu, the z the agent sees in the real env)"""

    @property
    def mixtures(self) -> int:
        return 1 if self.arch == "gru" else self.num_mixtures


class Prediction(NamedTuple):
    """Head outputs; leading dims (B,) for a step or (B, T) for a sequence."""
    logit_pi: torch.Tensor  # (..., latent, K) mixture weights (unnormalised)
    mu: torch.Tensor  # (..., latent, K)
    log_sigma: torch.Tensor  # (..., latent, K)
    reward: torch.Tensor  # (...,)
    done_logit: torch.Tensor  # (...,)


class RecurrentWorldModel(nn.Module):
    """What both models share: the input [z, a], the mixture head, the losses and the sampler."""

    def __init__(self, config: WorldModelConfig):
        super().__init__()
        self.config = config
        self.input_dim = config.latent_dim + config.action_dim
        k, latent = config.mixtures, config.latent_dim
        self.head = nn.Linear(config.hidden_dim, 3 * latent * k + 2)  # pi, mu, log_sigma per (dim, k); reward; done

    # --- the recurrent cell, per subclass
    state_size: int

    def initial_state(self, batch: int, device=None) -> torch.Tensor:
        return torch.zeros(batch, self.state_size, device=device)

    def features(self, state: torch.Tensor) -> torch.Tensor:
        """The h a controller sees: (B, hidden_dim)."""
        return state[:, :self.config.hidden_dim]

    @property
    def controller_input_dim(self) -> int:
        return self.config.latent_dim + self.config.hidden_dim

    def controller_input(self, z: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """What every controller sees, in the real env and in the dream: [z, h] (B, latent_dim + hidden_dim)."""
        return torch.cat([z, self.features(state)], -1)

    def _cell(self, x: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _sequence(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    # --- shared
    def _predict(self, h: torch.Tensor) -> Prediction:
        k, latent = self.config.mixtures, self.config.latent_dim
        out = self.head(h).float()  # (fp32 heads and losses even where the networks run in bf16: utils.autocast)
        z_params, reward, done_logit = out[..., :-2], out[..., -2], out[..., -1]
        logit_pi, mu, log_sigma = z_params.unflatten(-1, (3, latent, k)).unbind(-3)
        return Prediction(logit_pi, mu, log_sigma.clamp(LOG_SIGMA_MIN, LOG_SIGMA_MAX), reward, done_logit)

    def step(self, z: torch.Tensor, action: torch.Tensor, state: torch.Tensor) -> tuple[Prediction, torch.Tensor]:
        """One time step: z (B, latent), action (B, action_dim), state (B, state_size)."""
        state = self._cell(torch.cat([z, action], -1), state).float()  # (a dream carries its state in fp32)
        return self._predict(self.features(state)), state

    def forward(self, z: torch.Tensor, action: torch.Tensor, state: torch.Tensor | None = None
                ) -> tuple[Prediction, torch.Tensor]:
        """Whole sequences: z (B, T, latent), action (B, T, action_dim) -> predictions (B, T, ...), final state."""
        if state is None:
            state = self.initial_state(z.shape[0], z.device)
        hidden, state = self._sequence(torch.cat([z, action], -1), state)
        return self._predict(hidden), state.float()

    @staticmethod
    def z_log_prob(pred: Prediction, z_next: torch.Tensor) -> torch.Tensor:
        """log p(z_next) per dim under the mixture: (..., latent)."""
        log_pi = F.log_softmax(pred.logit_pi, -1)
        normal = -0.5 * ((z_next.unsqueeze(-1) - pred.mu) * torch.exp(-pred.log_sigma)) ** 2
        normal = normal - pred.log_sigma - 0.5 * math.log(2 * math.pi)
        return torch.logsumexp(log_pi + normal, -1)

    def loss(self, pred: Prediction, z_next: torch.Tensor, reward: torch.Tensor, done: torch.Tensor,
             step_mask: torch.Tensor, z_mask: torch.Tensor, reward_overshoot_weight: float = 1.0,
             done_pos_weight: float = 10.0, reward_overshoot_where: str = "all",
             reward_huber_delta: float = 1.0) -> dict[str, torch.Tensor]:
        """Masked mean losses over (B, T): next-z NLL per dim, reward Huber, done BCE; `loss` is their sum.

        `reward_overshoot_weight` > 1 punishes predicting more reward than was received more than
        predicting less: on every step (`reward_overshoot_where` "all"), or only on steps that earned no new
        tile (reward < 0: grass, visited road; "no-tile"), so that the model is pessimistic where the road may be
        lost without paying less for the second tile of a fast decision. The reward Huber loss is squared within
        `reward_huber_delta` of the target (1 and below: about the median; a few tiles' worth: about the mean) and
        linear beyond (-100 for leaving the playfield does not swamp it). `z_mask` drops the last step of each
        episode, which has no next frame.
        """
        if reward_overshoot_where not in ("all", "no-tile"):
            raise ValueError(f"reward_overshoot_where must be all or no-tile, not {reward_overshoot_where!r}")
        z_nll = -(self.z_log_prob(pred, z_next).mean(-1) * z_mask).sum() / z_mask.sum().clamp(min=1)
        reward_error = F.huber_loss(pred.reward, reward, reduction="none", delta=reward_huber_delta)
        overshot = pred.reward > reward
        if reward_overshoot_where == "no-tile":
            overshot = overshot & (reward < 0)
        overshoot = torch.where(overshot, reward_overshoot_weight, 1.0)
        steps = step_mask.sum().clamp(min=1)
        reward_loss = (reward_error * overshoot * step_mask).sum() / steps
        done_loss = (F.binary_cross_entropy_with_logits(
            pred.done_logit, done.float(), pos_weight=torch.tensor(done_pos_weight, device=done.device),
            reduction="none") * step_mask).sum() / steps
        return {"loss": z_nll + reward_loss + done_loss, "z_nll": z_nll, "reward": reward_loss, "done": done_loss}

    @staticmethod
    def mixture_mean(pred: Prediction) -> torch.Tensor:
        """E[z_next]: (..., latent)."""
        return (F.softmax(pred.logit_pi, -1) * pred.mu).sum(-1)

    @staticmethod
    def sample_next(pred: Prediction, temperature: float, uniform: torch.Tensor, normal: torch.Tensor) -> torch.Tensor:
        """Sample z_next (B, latent) with temperature tau, from given noise (so callers control randomness).

        As in the original: mixture weights are softmax(logit / tau) and each Gaussian's std is scaled
        by sqrt(tau). tau = 0 takes the most likely component's mean (deterministic).
        `uniform` (B, latent) in [0, 1) picks components, `normal` (B, latent) is standard normal.
        """
        if temperature <= 0:
            index = pred.logit_pi.argmax(-1, keepdim=True)
            return pred.mu.gather(-1, index).squeeze(-1)
        cumulative = F.softmax(pred.logit_pi / temperature, -1).cumsum(-1)
        index = (cumulative < uniform.unsqueeze(-1)).sum(-1, keepdim=True).clamp(max=pred.mu.shape[-1] - 1)
        mu, log_sigma = pred.mu.gather(-1, index).squeeze(-1), pred.log_sigma.gather(-1, index).squeeze(-1)
        return mu + torch.exp(log_sigma) * math.sqrt(temperature) * normal


class WorldModelGRU(RecurrentWorldModel):
    def __init__(self, config: WorldModelConfig):
        super().__init__(config)
        self.rnn = nn.GRU(self.input_dim, config.hidden_dim, batch_first=True)
        self.state_size = config.hidden_dim

    def _cell(self, x, state):
        rnn = self.rnn
        return torch.gru_cell(x, state, rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)

    def _sequence(self, x, state):
        hidden, h = self.rnn(x, state.unsqueeze(0).contiguous())
        return hidden, h.squeeze(0)


class MDNRNN(RecurrentWorldModel):
    def __init__(self, config: WorldModelConfig):
        super().__init__(config)
        self.rnn = nn.LSTM(self.input_dim, config.hidden_dim, batch_first=True)
        self.state_size = 2 * config.hidden_dim

    def _cell(self, x, state):
        h, c = state.chunk(2, -1)
        rnn = self.rnn
        h, c = torch.lstm_cell(x, (h, c), rnn.weight_ih_l0, rnn.weight_hh_l0, rnn.bias_ih_l0, rnn.bias_hh_l0)
        return torch.cat([h, c], -1)

    def _sequence(self, x, state):
        h, c = state.chunk(2, -1)
        hidden, (h, c) = self.rnn(x, (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous()))
        return hidden, torch.cat([h.squeeze(0), c.squeeze(0)], -1)


ARCHITECTURES = {"gru": WorldModelGRU, "mdn": MDNRNN}


def build_world_model(config: WorldModelConfig) -> RecurrentWorldModel:
    if config.arch not in ARCHITECTURES:
        raise ValueError(f"unknown world model arch {config.arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[config.arch](config)
