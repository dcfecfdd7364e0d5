"""Make an ensemble agent: several controllers, each with the world model it was trained in, act together on one
VAE; the action is the mean of theirs (agent.Agent), weighted by --weights if given. Dream-trained controllers of
runs with other seeds fail on other tracks, so their mean fails on fewer.

Members may be controllers of different kinds (--controller ppo ppo_dream: a PPO controller trained in the real env
beside a dream-trained one); each is played exactly as it was trained, only the action is shared.

Reads:  each of MEMBERS (checkpoint dirs): world_model.pt and controller_<CONTROLLER>.pt, all trained on the first
        member's vae.pt (for a dream loop with another --seed, copy that vae.pt into its --ckpt-dir before it
        starts: the loop then uses it instead of training its own).
Writes: OUT_DIR/vae.pt, world_model.pt and controller_<CONTROLLER>.pt: the first member's (copied, unless OUT_DIR is
        that member); OUT_DIR/member<i>/world_model.pt and controller_<CONTROLLER>.pt for every other member i;
        OUT_DIR/controller_ensemble.pt: the members' files and their hashes. A member dir inside OUT_DIR (say
        OUT_DIR/dream/, an agent shipped beside it) is not copied: the ensemble names its files where they are.
        Play it with evaluate.py, play_game.py or create_video.py --ckpt-dir OUT_DIR (the ensemble is their
        default controller there; a dream video shows the first member in its own dream).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from agent import CONTROLLER_SCRIPTS, ControllerName, controller_path, load_agent, load_controller
from utils import UserError, atomic_write, checkpoint_identity, file_sha256, run_main, save_checkpoint


@dataclass
class Args:
    members: list[Path] = field(default_factory=list)
    """checkpoint dirs of the members, two or more (the first gives the VAE and the world model of OUT_DIR)"""
    out_dir: Path = Path("checkpoints/ensemble")
    """where the ensemble agent is written (may be the first member's dir)"""
    controller: list[ControllerName] = field(default_factory=lambda: ["ppo_dream"])
    """which controller of each member dir: one name for all, or one name per member"""
    weights: list[float] = field(default_factory=list)
    """each member's weight in the mean of their actions, one positive number per member (default: all equal)"""
    drop_critic: bool = False
    """write the controllers' copies without their critics: half the size, and the actor alone plays (PPO cannot go
    on from them); OUT_DIR must then be a dir of its own"""


def copy_file(source: Path, target: Path) -> None:
    if source.resolve() != target.resolve():
        with open(source, "rb") as f:
            atomic_write(target, lambda out: shutil.copyfileobj(f, out))


def copy_controller(source: Path, target: Path, drop_critic: bool) -> None:
    if not drop_critic:
        return copy_file(source, target)
    checkpoint = torch.load(source, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items()
                                if not key.startswith("critic.")}
    save_checkpoint(target, checkpoint | {"play_only": True})


def main(args: Args) -> None:
    if len(args.members) < 2:
        raise UserError("--members needs two or more checkpoint dirs")
    names = list(args.controller) * (len(args.members) if len(args.controller) == 1 else 1)
    if len(names) != len(args.members):
        raise UserError(f"--controller names {len(names)} controllers for {len(args.members)} members: "
                        "give one name for all, or one per member")
    if args.weights and (len(args.weights) != len(args.members) or min(args.weights) <= 0):
        raise UserError(f"--weights gives {len(args.weights)} weights for {len(args.members)} members: "
                        "one positive weight per member")
    if "ensemble" in names:
        raise UserError("--controller names the members' controllers: ppo, ppo_dream or cmaes")
    base = args.members[0]
    for member, name in zip(args.members, names):
        if not member.is_dir():
            raise UserError(f"member {member} is not a checkpoint dir")
        # each member's controller must have been trained on the base VAE and on its own world model
        load_controller(controller_path(member, name), base, member / "world_model.pt", script=CONTROLLER_SCRIPTS[name])
    out_dir, resolved = args.out_dir.resolve(), [member.resolve() for member in args.members]
    if out_dir in resolved[1:]:
        raise UserError(f"--out-dir {args.out_dir} is a member other than the first: choose another dir")
    inside = [member.is_relative_to(out_dir) for member in resolved]
    if args.drop_critic and any(inside):
        raise UserError("--drop-critic writes play-only copies: choose an --out-dir that holds no member")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    files = []  # (world model, controller) of each member, relative to OUT_DIR
    for index, (member, name) in enumerate(zip(args.members, names)):
        if index == 0:  # the first member's files are OUT_DIR's own
            subdir = Path()
        elif inside[index]:  # named where it is (copying it onto itself is a no-op)
            subdir = resolved[index].relative_to(out_dir)
        else:
            subdir = Path(f"member{index}")
        controller_file = controller_path(member, name).name
        copy_file(member / "world_model.pt", args.out_dir / subdir / "world_model.pt")
        copy_controller(member / controller_file, args.out_dir / subdir / controller_file, args.drop_critic)
        files.append((subdir / "world_model.pt", subdir / controller_file))
    copy_file(base / "vae.pt", args.out_dir / "vae.pt")
    weights = args.weights or [1.0] * len(args.members)
    members = [{"world_model": world_model.as_posix(), "controller": controller.as_posix(),
                "sha256": [file_sha256(args.out_dir / world_model), file_sha256(args.out_dir / controller)],
                "weight": weight, "source": str(member)}
               for (world_model, controller), member, weight in zip(files, args.members, weights)]
    save_checkpoint(controller_path(args.out_dir, "ensemble"), {
        "config": {"members": members}, "state_dict": {},  # (no weights of its own: the members' files hold them)
        "args": {"members": [str(m) for m in args.members], "controller": names, "weights": weights,
                 "out_dir": str(args.out_dir), "drop_critic": args.drop_critic},
        "vae": checkpoint_identity(args.out_dir / "vae.pt")})
    agent = load_agent(args.out_dir, "ensemble")  # the ensemble as every consumer will load it
    print(f"ensemble of {len(agent.members)} controllers ({', '.join(names)}; from "
          f"{', '.join(map(str, args.members))}"
          + (f"; weights {', '.join(f'{w:g}' for w in weights)}" if args.weights else "")
          + f") in {controller_path(args.out_dir, 'ensemble')}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
