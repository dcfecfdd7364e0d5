import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_episode(steps: int = 20, seed: int = 0) -> dict:
    """A synthetic episode following the contract (random frames, no env needed)."""
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
        "reward": rng.normal(size=steps).astype(np.float32),
        "terminated": np.zeros(steps, bool),
        "truncated": np.r_[np.zeros(steps - 1, bool), True],
        "seed": seed,
    }


@pytest.fixture
def episode_factory():
    return make_episode


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a repo script the way a user does, in a fresh interpreter."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


TINY_WORLD_MODEL = {"latent_dim": 4, "hidden_dim": 16, "num_mixtures": 3}


def make_checkpoint_dir(tmp_path, arch="gru", world_model=None, action_repeat=1):
    """A tiny VAE and world model (random at ACTION_REPEAT, or the one given) saved the way the stages save them."""
    from conv_vae import ConvVAE, ConvVAEConfig
    from utils import checkpoint_identity, plain, save_checkpoint
    from world_model import WorldModelConfig, build_world_model

    torch.manual_seed(4)
    ckpt = tmp_path / "ckpt"
    vae_config = ConvVAEConfig(latent_dim=4, channels=(8, 8, 8, 8))
    save_checkpoint(ckpt / "vae.pt", {"config": plain(vae_config), "state_dict": ConvVAE(vae_config).state_dict()})
    model = world_model or build_world_model(WorldModelConfig(arch=arch, action_repeat=action_repeat,
                                                              **TINY_WORLD_MODEL))
    save_checkpoint(ckpt / "world_model.pt", {
        "config": plain(model.config), "state_dict": model.state_dict(), "vae": checkpoint_identity(ckpt / "vae.pt"),
        "start_bank": {"mu": torch.randn(5, 4), "logvar": torch.full((5, 4), -2.0)}})
    return ckpt


def save_linear_controller(ckpt, seed: int = 0):
    """A random linear controller for the tiny agent, with the identities of its VAE and world model."""
    from actor_critic import ControllerConfig, LinearController
    from agent import controller_path
    from utils import checkpoint_identity, plain, save_checkpoint

    torch.manual_seed(seed)
    config = ControllerConfig(kind="linear", obs_dim=4 + 16)
    save_checkpoint(controller_path(ckpt, "cmaes"), {
        "config": plain(config), "state_dict": LinearController(config).state_dict(),
        "vae": checkpoint_identity(ckpt / "vae.pt"), "world_model": checkpoint_identity(ckpt / "world_model.pt")})


def save_actor_critic(ckpt, name: str = "ppo_dream", seed: int = 0, action_repeat: int = 1):
    """A random PPO controller (actor and critic) for the tiny agent as controller NAME of CKPT."""
    from actor_critic import ActorCritic, ControllerConfig
    from agent import controller_path
    from utils import checkpoint_identity, plain, save_checkpoint

    torch.manual_seed(seed)
    config = ControllerConfig(kind="actor_critic", obs_dim=4 + 16, hidden_dim=8, action_repeat=action_repeat)
    save_checkpoint(controller_path(ckpt, name), {
        "config": plain(config), "state_dict": ActorCritic(config).state_dict(),
        "vae": checkpoint_identity(ckpt / "vae.pt"), "world_model": checkpoint_identity(ckpt / "world_model.pt")})
