"""ConvVAE: the vision model V of World Models (Ha & Schmidhuber, 2018).

A 64x64 RGB frame is compressed to a 32-d latent z. The architecture is the original one:
four stride-2 4x4 convolutions (32-64-128-256) down to 2x2x256, two linear heads for mu and
log-variance, and a decoder of four stride-2 transposed convolutions (kernels 5-5-6-6) from a
1x1x1024 map back to 64x64x3 (sigmoid). About 4.35M parameters at the default sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DASHBOARD_SHARE = 8  # CarRacing's dashboard is the bottom 1/8 of the frame: rows 84-95 of 96, 56-63 of 64


def dashboard_rows(height: int) -> slice:
    """The rows of a frame HEIGHT rows high that hold the dashboard (its gauges' strip): 56-63 of 64."""
    return slice(height - height // DASHBOARD_SHARE, height)


@dataclass
class ConvVAEConfig:
    latent_dim: int = 32
    """size of z"""
    channels: tuple[int, int, int, int] = (32, 64, 128, 256)
    """encoder widths; the decoder mirrors them"""
    kl_tolerance: float = 0.5
    """free bits per latent dim: the KL term is max(KL, kl_tolerance * latent_dim), as in the original"""
    dashboard_weight: float = 1.0
    """weight of the dashboard's squared error in the loss (1 = the original): the bottom eighth of the frame holds the
    speed, ABS, steering and gyro gauges, bars of a few pixels at 64x64 that an unweighted loss reconstructs poorly"""

    @classmethod
    def from_dict(cls, values: dict) -> "ConvVAEConfig":
        values = dict(values)
        values["channels"] = tuple(values["channels"])
        return cls(**values)


class ConvVAE(nn.Module):
    def __init__(self, config: ConvVAEConfig):
        super().__init__()
        self.config = config
        c1, c2, c3, c4 = config.channels
        self.encoder = nn.Sequential(  # (B, 3, 64, 64) -> (B, c4, 2, 2)
            nn.Conv2d(3, c1, 4, stride=2), nn.ReLU(),
            nn.Conv2d(c1, c2, 4, stride=2), nn.ReLU(),
            nn.Conv2d(c2, c3, 4, stride=2), nn.ReLU(),
            nn.Conv2d(c3, c4, 4, stride=2), nn.ReLU(),
        )
        flat = 4 * c4
        self.to_mu = nn.Linear(flat, config.latent_dim)
        self.to_logvar = nn.Linear(flat, config.latent_dim)
        self.from_latent = nn.Linear(config.latent_dim, flat)
        self.decoder = nn.Sequential(  # (B, 4*c4, 1, 1) -> 5 -> 13 -> 30 -> (B, 3, 64, 64)
            nn.ConvTranspose2d(flat, c3, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(c3, c2, 5, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(c2, c1, 6, stride=2), nn.ReLU(),
            nn.ConvTranspose2d(c1, 3, 6, stride=2), nn.Sigmoid(),
        )

    @staticmethod
    def to_input(frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, 64, 64, 3) -> float (B, 3, 64, 64) in [0, 1]."""
        return frames.permute(0, 3, 1, 2).float().div_(255.0)

    @staticmethod
    def to_image(x: torch.Tensor) -> np.ndarray:
        """The inverse of to_input: float (B, 3, 64, 64) in [0, 1] -> uint8 frames (B, 64, 64, 3) as numpy."""
        return (x.permute(0, 2, 3, 1).clamp(0, 1) * 255).round().byte().cpu().numpy()

    @torch.no_grad()
    def decode_frames(self, z: torch.Tensor) -> np.ndarray:
        """z (B, latent_dim) -> the decoded uint8 frames (B, 64, 64, 3), for pictures and videos."""
        return self.to_image(self.decode(z))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, 3, 64, 64) in [0, 1] -> mu, logvar: (B, latent_dim) each."""
        h = self.encoder(x).flatten(1)
        return self.to_mu(h), self.to_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, latent_dim) -> (B, 3, 64, 64) in [0, 1]."""
        return self.decoder(self.from_latent(z)[:, :, None, None])

    @staticmethod
    def sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.sample(mu, logvar)), mu, logvar

    def loss(self, x: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        """Per-image loss: summed squared error over pixels + KL, the KL floored at the tolerance.

        Returns `loss` (what is minimised: the dashboard rows' error weighted by dashboard_weight),
        `recon` (the plain summed squared error, comparable across weights), `dashboard` (its share in
        the gauges' strip) and `kl` (the KL before the floor), each a mean over the batch.
        `sample=False` decodes mu instead of a sample: a deterministic figure for validation.
        """
        # the sums, exp and KL in fp32 even where the networks run in bf16 (train_vae.py --precision bf16)
        mu, logvar = (t.float() for t in self.encode(x))
        recon_x = self.decode(self.sample(mu, logvar) if sample else mu).float()
        squared_error = (recon_x - x).pow(2).sum(1)  # (B, H, W)
        recon = squared_error.flatten(1).sum(1).mean()
        dashboard = squared_error[:, dashboard_rows(x.shape[-2])].flatten(1).sum(1).mean()
        weighted_recon = recon + (self.config.dashboard_weight - 1) * dashboard
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        kl_floor = self.config.kl_tolerance * self.config.latent_dim
        return {"loss": weighted_recon + torch.clamp(kl, min=kl_floor), "recon": recon, "dashboard": dashboard,
                "kl": kl}
