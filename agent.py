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


ControllerName = Literal["ensemble", "ppo", "ppo_dream", "cmaes"]  # the controllers a checkpoint dir can hold


CONTROLLER_SCRIPTS = {"ensemble": "make_ensemble.py", "ppo": "train_ppo.py", "ppo_dream": "train_ppo_in_dream.py",
                      "cmaes": "train_cmaes_in_dream.py"}  # controller name -> the stage that makes it


assert tuple(CONTROLLER_SCRIPTS) == get_args(ControllerName)


def controller_path(ckpt_dir: Path, name: str) -> Path:
    return Path(ckpt_dir) / f"controller_{name}.pt"


PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"  # the shipped agent


def agent_dir_and_controller(ckpt_dir: Path | None, controller: str | None) -> tuple[Path, str]:
    """The agent a watching/evaluation script plays: CKPT_DIR (default: pretrained/) and the controller
    named, or else the first of CONTROLLER_SCRIPTS' order that CKPT_DIR holds (an ensemble before its members)."""
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

    def observe(self, frames: np.ndarray, z: torch.Tensor | None = None) -> torch.Tensor:
        """[z, h] of the frames (B, 64, 64, 3); Z, when given, is their latent already encoded (an ensemble's
        members share one VAE, so the frames are encoded once for all of them)."""
        self.z = self.encode(frames) if z is None else z
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

    MEMBERS is one (world model, controller) pair, or several for an ensemble: each member keeps its own h
    from the shared z, the action taken is the mean of the members' actions (weighted by WEIGHTS, equal when
    not given), and every member's h remembers that action. `features` and `controller` are the first member's
    (the one a dream video shows).
    """

    def __init__(self, vae, members: list[tuple], device="cpu", action_repeat: int = 1, noise: float = 0.0,
                 weights: list[float] | None = None):
        if not members:
            raise ValueError("an agent needs at least one (world model, controller) member")
        weights = [1.0] * len(members) if weights is None else list(weights)
        if len(weights) != len(members) or min(weights) <= 0:
            raise ValueError(f"one positive weight per member: {weights} for {len(members)} members")
        self.members = [(FeatureTracker(vae, world_model, 1, device), controller)
                        for world_model, controller in members]
        self.weights = torch.tensor(weights, device=device).div(sum(weights))[:, None, None]  # (members, 1, 1)
        self.features, self.controller = self.members[0]
        self.action_repeat, self.noise = action_repeat, noise
        self.frame_count, self.action = 0, None
        self.rng = np.random.default_rng(0)

    def reset(self, seed: int) -> None:
        for features, _ in self.members:
            features.reset()
        self.frame_count = 0
        self.rng = np.random.default_rng([seed, 2])

    @torch.no_grad()
    def act(self, frame: np.ndarray) -> np.ndarray:
        """One decision on a preprocessed frame (64, 64, 3): the action (3,), every h stepped once."""
        z = self.features.encode(frame[None])  # (1, latent_dim), shared by the members
        actions = [controller(features.observe(frame[None], z)) for features, controller in self.members]
        action = (torch.stack(actions) * self.weights).sum(0)[0].cpu().numpy()  # (3,): the members' mean, in the box
        if self.noise > 0:
            action = np.clip(action + self.noise * self.rng.standard_normal(3), ACTION_LOW, ACTION_HIGH)
        self.action = action.astype(np.float32)
        taken = torch.from_numpy(self.action)[None].to(self.features.device)
        for features, _ in self.members:
            features.remember(taken)
        return self.action

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        if self.frame_count % self.action_repeat == 0:
            self.act(frame)
        self.frame_count += 1
        return self.action


def load_controller(path: Path, ckpt_dir: Path, world_model_path: Path, device="cpu", script: str = "") -> tuple:
    """The controller of checkpoint PATH, checked to be trained with CKPT_DIR/vae.pt and WORLD_MODEL_PATH:
    (model in eval mode, its config)."""
    checkpoint = load_checkpoint(path, map_location=device, stage_hint=script)
    try:
        config = ControllerConfig(**checkpoint["config"])
        model = build_controller(config)
        missing, unexpected = model.load_state_dict(checkpoint["state_dict"], strict=False)
        # a play-only copy (make_ensemble.py --drop-critic) lacks the critic, which playing never uses
        critic = {key for key in model.state_dict() if key.startswith("critic.")}
        allowed = critic if checkpoint.get("play_only") else set()
        if unexpected or not set(missing) <= allowed:
            raise KeyError(f"missing {missing}, unexpected {unexpected}")
    except (TypeError, KeyError, ValueError, RuntimeError) as error:
        raise UserError(f"checkpoint {path} is not a controller checkpoint ({type(error).__name__}); run {script}")
    for part, part_path in (("vae", Path(ckpt_dir) / "vae.pt"), ("world_model", world_model_path)):
        if checkpoint.get(part, {}).get("sha256") != file_sha256(part_path):
            raise UserError(f"{path} was trained with another {part.replace('_', ' ')} than {part_path}: "
                            f"re-run {script}")
    return model.to(device).eval(), config


def ensemble_members(ckpt_dir: Path) -> list[tuple[Path, Path, float]]:
    """The (world model, controller) files of CKPT_DIR's ensemble (controller_ensemble.pt, make_ensemble.py), each
    checked to be the file the ensemble was made of, with the member's weight in the action's mean (1 when the
    ensemble was made before weights were recorded)."""
    path = controller_path(ckpt_dir, "ensemble")
    checkpoint = load_checkpoint(path, stage_hint=CONTROLLER_SCRIPTS["ensemble"])
    try:
        members = [(Path(ckpt_dir) / m["world_model"], Path(ckpt_dir) / m["controller"], m["sha256"],
                    float(m.get("weight", 1.0))) for m in checkpoint["config"]["members"]]
        if not members or not all(isinstance(sha256, list) and len(sha256) == 2 and all(
                isinstance(digest, str) for digest in sha256) for _, _, sha256, _ in members):
            raise ValueError("no members, or not a hash per member file")
        if not all(weight > 0 for *_, weight in members):
            raise ValueError("a member's weight is not positive")
    except (TypeError, KeyError, ValueError) as error:
        raise UserError(f"checkpoint {path} is not an ensemble checkpoint ({type(error).__name__}): "
                        "run make_ensemble.py")
    for world_model_path, controller_file, sha256, _ in members:
        for member_file, expected in zip((world_model_path, controller_file), sha256):
            if not member_file.is_file() or file_sha256(member_file) != expected:
                raise UserError(f"{member_file}, a member of the ensemble {path}, is missing or has changed since: "
                                "re-run make_ensemble.py")
    return [(world_model_path, controller_file, weight) for world_model_path, controller_file, _, weight in members]


def agent_files_of(ckpt_dir: Path, controller: str) -> list[Path]:
    """Every file the agent of CKPT_DIR with CONTROLLER reads (what a cluster node needs to play it)."""
    ckpt_dir = Path(ckpt_dir)
    files = [ckpt_dir / "vae.pt", ckpt_dir / "world_model.pt", controller_path(ckpt_dir, controller)]
    if controller == "ensemble":
        files += [path for *member, _ in ensemble_members(ckpt_dir) for path in member if path not in files]
    return files


def load_member(path: Path, world_model_path: Path, ckpt_dir: Path, device="cpu", script: str = "",
                loaded: tuple | None = None) -> tuple:
    """One (world model, controller) member of an agent: the controller of PATH checked against CKPT_DIR/vae.pt and
    WORLD_MODEL_PATH (LOADED: that world model and its checkpoint, if already loaded), and both on one clock:
    (world model, controller, its config)."""
    world_model, wm_checkpoint = loaded or load_world_model(world_model_path, device)
    model, config = load_controller(path, ckpt_dir, world_model_path, device, script)
    # one clock: the controller decides at the world model's rate (a world model saved before the rate was
    # recorded does not say it, and the controller's own is taken)
    if "action_repeat" in wm_checkpoint["config"] and config.action_repeat != world_model.config.action_repeat:
        raise UserError(f"{path} decides every {config.action_repeat} frames but {world_model_path} "
                        f"steps every {world_model.config.action_repeat}: re-run {script}")
    return world_model, model, config


def load_agent(ckpt_dir: Path, controller: str, device="cpu", noise: float = 0.0) -> Agent:
    """The one way every consumer builds an agent; a mismatch of any part is a UserError."""
    if controller not in CONTROLLER_SCRIPTS:
        raise UserError(f"unknown controller {controller!r}: choose one of {', '.join(CONTROLLER_SCRIPTS)}")
    ckpt_dir = Path(ckpt_dir)
    vae, *dir_world_model = load_vae_and_world_model(ckpt_dir, device)  # (world model, its checkpoint)
    script = CONTROLLER_SCRIPTS[controller]
    if controller == "ensemble":
        files = ensemble_members(ckpt_dir)
    else:
        files = [(ckpt_dir / "world_model.pt", controller_path(ckpt_dir, controller), 1.0)]
    members, action_repeats = [], set()
    for world_model_path, path, _ in files:
        loaded = dir_world_model if world_model_path == ckpt_dir / "world_model.pt" else None
        world_model, model, config = load_member(path, world_model_path, ckpt_dir, device, script, loaded)
        members.append((world_model, model))
        action_repeats.add(config.action_repeat)
    if len(action_repeats) > 1:
        raise UserError(f"the members of {controller_path(ckpt_dir, controller)} decide at different rates "
                        f"({sorted(action_repeats)} frames): re-run make_ensemble.py with members of one clock")
    return Agent(vae, members, device, action_repeats.pop(), noise, weights=[weight for *_, weight in files])
