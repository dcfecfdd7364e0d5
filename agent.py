"""The agent: loading a checkpoint dir's VAE, world model and controller (checked to belong together),
the features [z, h] the controller sees (`FeatureTracker`), and `Agent`, frames in, actions out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np
import torch

from actor_critic import ACTION_HIGH, ACTION_LOW, ControllerConfig, build_controller
from conv_vae import ConvVAE, ConvVAEConfig
from utils import UserError, file_sha256, load_checkpoint
from world_model import WorldModelConfig, build_world_model


def load_vae(path: Path, device="cpu"):
    """The ConvVAE of a checkpoint, rebuilt from its stored config, in eval mode: (model, checkpoint)."""
    checkpoint = load_checkpoint(path, map_location=device, stage_hint="train_vae.py")
    try:
        model = ConvVAE(ConvVAEConfig.from_dict(checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} is not a ConvVAE checkpoint ({type(error).__name__}); run train_vae.py")
    return model.to(device).eval(), checkpoint


def load_world_model(path: Path, device="cpu"):
    """The world model of a checkpoint, rebuilt from its stored config, in eval mode: (model, checkpoint)."""
    checkpoint = load_checkpoint(path, map_location=device, stage_hint="train_world_model.py")
    try:
        model = build_world_model(WorldModelConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} is not a world model checkpoint ({type(error).__name__}); "
                        "run train_world_model.py")
    return model.to(device).eval(), checkpoint


def load_vae_and_world_model(ckpt_dir: Path, device="cpu"):
    """VAE and world model of a checkpoint dir, checked to belong together: (vae, world_model, wm_checkpoint)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint dir {ckpt_dir} not found")
    vae, _ = load_vae(ckpt_dir / "vae.pt", device)
    world_model, checkpoint = load_world_model(ckpt_dir / "world_model.pt", device)
    if checkpoint["vae"]["sha256"] != file_sha256(ckpt_dir / "vae.pt"):
        raise UserError(f"{ckpt_dir / 'world_model.pt'} was trained on another VAE than {ckpt_dir / 'vae.pt'}: "
                        "re-run train_world_model.py")
    return vae, world_model, checkpoint


ControllerName = Literal["ppo", "ppo_dream", "cmaes"]  # the controllers a checkpoint dir can hold


CONTROLLER_SCRIPTS = {"ppo": "train_ppo.py", "ppo_dream": "train_ppo_in_dream.py",
                      "cmaes": "train_cmaes_in_dream.py"}  # controller name -> the stage that trains it


assert tuple(CONTROLLER_SCRIPTS) == get_args(ControllerName)


def controller_path(ckpt_dir: Path, name: str) -> Path:
    return Path(ckpt_dir) / f"controller_{name}.pt"


PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"  # the shipped agent


def agent_dir_and_controller(ckpt_dir: Path | None, controller: str | None) -> tuple[Path, str]:
    """The agent a watching/evaluation script plays: CKPT_DIR (default: pretrained/) and the controller
    named, or else the first of CONTROLLER_SCRIPTS' order that CKPT_DIR holds."""
    ckpt_dir = PRETRAINED_DIR if ckpt_dir is None else Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"checkpoint dir {ckpt_dir} not found" +
                        (": no agent has been shipped yet, pass --ckpt-dir checkpoints" if ckpt_dir == PRETRAINED_DIR
                         else ""))
    if controller is None:
        found = [name for name in CONTROLLER_SCRIPTS if controller_path(ckpt_dir, name).exists()]
        if not found:
            raise UserError(f"no controller_*.pt in {ckpt_dir}: train one ({', '.join(CONTROLLER_SCRIPTS.values())})")
        controller = found[0]
    return ckpt_dir, controller


class FeatureTracker:
    """The agent's features [z, h] for B envs: z is the VAE's mu of the current frame, h the world
    model's memory of the (z, action) pairs so far. Per step: `observe(frames)` -> [z, h], the
    controller acts, `remember(actions)` steps the world model so h includes that step."""

    def __init__(self, vae, world_model, batch: int = 1, device="cpu"):
        self.vae, self.world_model, self.device = vae, world_model, device
        self.state = world_model.initial_state(batch, device)
        self.z = torch.zeros(batch, world_model.config.latent_dim, device=device)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        """Preprocessed frames (B, 64, 64, 3) uint8 -> z (B, latent_dim), the VAE's mean."""
        return self.vae.encode(ConvVAE.to_input(torch.as_tensor(frames, device=self.device)))[0]

    def observe(self, frames: np.ndarray) -> torch.Tensor:
        self.z = self.encode(frames)
        return self.world_model.controller_input(self.z, self.state)

    @torch.no_grad()
    def remember(self, actions: torch.Tensor) -> None:
        _, self.state = self.world_model.step(self.z, actions, self.state)

    def reset(self, mask: torch.Tensor | None = None) -> None:
        """Forget the past of the envs where `mask` (B,) is set (all if None)."""
        initial = self.world_model.initial_state(len(self.state), self.device)
        self.state = initial if mask is None else torch.where(mask[:, None].to(self.device), initial, self.state)


class Agent:
    """VAE + world model + controller: preprocessed 64x64 frames in, actions out, h carried along.

    The policy interface (rollouts.drive): `reset(seed)` at each episode, then `agent(frame)` per frame:
    with `action_repeat` k the agent decides on frames 0, k, 2k, ... and holds each action in between, as
    it was trained (the frames in between are not encoded, and h steps once per decision). `agent.act(frame)`
    decides on every frame it is given, for an env that holds each action for k frames itself (ActionRepeat).
    With `noise` > 0 each decision gets Gaussian exploration noise, drawn from a generator `reset(seed)`
    seeds (the same track, the same noise); h remembers the action taken, noise included. Noise 0 (the
    default) is the deterministic agent that evaluation plays.
    """

    def __init__(self, vae, world_model, controller, device="cpu", action_repeat: int = 1, noise: float = 0.0):
        self.controller, self.action_repeat, self.noise = controller, action_repeat, noise
        self.features = FeatureTracker(vae, world_model, 1, device)
        self.frame_count, self.action = 0, None
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        self.features.reset()
        self.frame_count = 0
        self.rng = np.random.default_rng([seed, 2])

    @torch.no_grad()
    def act(self, frame: np.ndarray) -> np.ndarray:
        """One decision on a preprocessed frame (64, 64, 3): the action (3,), h stepped once."""
        action = self.controller(self.features.observe(frame[None]))[0].cpu().numpy()
        if self.noise > 0:
            action = np.clip(action + self.noise * self.rng.standard_normal(3), ACTION_LOW, ACTION_HIGH)
        self.action = action.astype(np.float32)
        self.features.remember(torch.from_numpy(self.action)[None].to(self.features.device))
        return self.action

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.frame_count % self.action_repeat == 0:
            self.act(frame)
        self.frame_count += 1
        return self.action


def load_agent(ckpt_dir: Path, controller: str, device="cpu", noise: float = 0.0) -> Agent:
    """The one way every consumer builds an agent; a mismatch of any part is a UserError."""
    if controller not in CONTROLLER_SCRIPTS:
        raise UserError(f"unknown controller {controller!r}: choose one of {', '.join(CONTROLLER_SCRIPTS)}")
    vae, world_model, wm_checkpoint = load_vae_and_world_model(ckpt_dir, device)
    path = controller_path(ckpt_dir, controller)
    checkpoint = load_checkpoint(path, map_location=device, stage_hint=CONTROLLER_SCRIPTS[controller])
    try:
        config = ControllerConfig(**checkpoint["config"])
        model = build_controller(config)
        model.load_state_dict(checkpoint["state_dict"])
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} is not a controller checkpoint ({type(error).__name__}); "
                        f"run {CONTROLLER_SCRIPTS[controller]}")
    for part in ("vae", "world_model"):
        if checkpoint.get(part, {}).get("sha256") != file_sha256(Path(ckpt_dir) / f"{part}.pt"):
            raise UserError(f"{path} was trained with another {part.replace('_', ' ')} than {Path(ckpt_dir) / part}.pt:"
                            f" re-run {CONTROLLER_SCRIPTS[controller]}")
    # one clock: the controller decides at the world model's rate (a world model saved before the rate was
    # recorded does not say it, and the controller's own is taken)
    if "action_repeat" in wm_checkpoint["config"] and config.action_repeat != world_model.config.action_repeat:
        raise UserError(f"{path} decides every {config.action_repeat} frames but {Path(ckpt_dir) / 'world_model.pt'} "
                        f"steps every {world_model.config.action_repeat}: re-run {CONTROLLER_SCRIPTS[controller]}")
    return Agent(vae, world_model, model.to(device).eval(), device, config.action_repeat, noise)
