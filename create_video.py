"""Record a video of an agent: in the real env, inside its dream, or both side by side.

Reads:  CKPT_DIR (default: pretrained/, the shipped agent): vae.pt, world_model.pt, controller_<CONTROLLER>.pt
        (and an ensemble's members, make_ensemble.py; --mode dream shows its first member in its own dream).
Writes: OUT, an mp4 (H.264 through imageio-ffmpeg) or, when OUT ends in .gif, a looping GIF. The video
        is written to a temporary name beside OUT and renamed when complete.

Modes (each writes exactly STEPS frames; an episode that ends early is followed by the next track):
- play:  the agent in the real CarRacing-v3, the env's own 600x400 view, step and score overlaid;
- dream: the agent driving inside the world model from a real start, the dream's z decoded by the
         VAE (64x64, upscaled), the dream's predicted reward and its sum overlaid;
- grid:  real | VAE reconstruction | open-loop dream, 64x64 each, upscaled: the agent drives the real
         env, and the dream starts from the same first frame and is fed the same actions, never
         corrected by a real frame, so you see how long the world model's imagination holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import cv2
import numpy as np
import torch
from tqdm import tqdm

from agent import ControllerName, agent_dir_and_controller, load_agent, load_vae_and_world_model
from dream import BatchedDream
from envs import make_env
from rollouts import drive
from utils import UserError, atomic_path, frames_grid, pick_device, run_main


@dataclass
class Args:
    ckpt_dir: Path | None = None
    """the agent (default: pretrained/)"""
    controller: ControllerName | None = None
    """which controller of CKPT_DIR (default: the first of ensemble, ppo, ppo_dream, cmaes it holds)"""
    mode: Literal["play", "dream", "grid"] = "play"
    """play: the agent in the real env; dream: the agent in its dream; grid: real | reconstruction | dream"""
    steps: int = 500
    """frames in the video (in dream mode one frame is one decision, the world model's step)"""
    out: Path = Path("videos/agent.mp4")
    """.mp4 or .gif"""
    fps: int = 30
    """frames per second of the video"""
    seed: int = 1_000_000
    """track seed (the next tracks follow if an episode ends), and the dream's seed"""
    scale: float = 1.0
    """resize every frame by this factor (e.g. 0.5 for a small GIF)"""
    temperature: float = 1.0
    """dream sampling temperature (dream and grid modes)"""
    max_steps: int = 1000
    """frames per real episode (play and grid modes)"""
    env_backend: str = "fast"
    """fast (pixel-exact CarRacing-v3) or gymnasium (stock)"""
    device: str = "cpu"
    """where the agent's networks run: cpu (the reported scores), auto, cuda or cuda:N"""


def overlay(image: np.ndarray, lines: list[str]) -> np.ndarray:
    """Write lines of white text on a dark box in the top-left corner of an RGB uint8 image."""
    image = np.ascontiguousarray(image)
    scale = max(0.35, image.shape[0] / 700)
    font = cv2.FONT_HERSHEY_SIMPLEX
    sizes = [cv2.getTextSize(line, font, scale, 1)[0] for line in lines]
    line_height = max(height for _, height in sizes) + 8
    width = max(width for width, _ in sizes) + 10
    image[:line_height * len(lines) + 4, :width] //= 3  # darken behind the text so it reads on grass and road
    for i, line in enumerate(lines):
        cv2.putText(image, line, (5, line_height * (i + 1)), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def play_frames(args: Args, agent) -> Iterator[np.ndarray]:
    env = make_env(args.env_backend, args.max_steps, render_mode="rgb_array")
    try:
        track = args.seed
        while True:
            score = 0.0
            for episode_step, step in enumerate(drive(env, agent, track, args.max_steps), 1):
                score += step.reward
                yield overlay(env.render(), [f"track {track}  step {episode_step}", f"score {score:.1f}"])
            track += 1
    finally:
        env.close()


def dream_frames(args: Args, agent, vae, world_model, bank) -> Iterator[np.ndarray]:
    dream = BatchedDream(world_model, bank["mu"], bank["logvar"], 1, args.temperature, device=agent.features.device)
    episode = 0
    while True:
        obs = dream.reset([args.seed + episode])
        total, done = 0.0, False
        while not done:
            with torch.no_grad():
                obs, reward, terminated, truncated = dream.step(agent.controller(obs))
            total += float(reward[0])
            done = bool(terminated[0] or truncated[0])
            image = cv2.resize(vae.decode_frames(dream.z)[0], (384, 384), interpolation=cv2.INTER_NEAREST)
            yield overlay(image, [f"dream {episode + 1}  step {int(dream.t[0])}  T={args.temperature:g}",
                                  f"reward {float(reward[0]):+.2f}  sum {total:.1f}"])
        episode += 1


def grid_frames(args: Args, agent, vae, world_model, bank) -> Iterator[np.ndarray]:
    """Real | reconstruction | open-loop dream. The dream starts from the first real frame's z and then
    only ever sees its own samples and the real actions, one world-model step per decision (the agent's
    action repeat): the dream column changes on decision frames and shows what it expects there."""
    env = make_env(args.env_backend, args.max_steps)
    dream = BatchedDream(world_model, bank["mu"], bank["logvar"], 1, args.temperature, max_steps=10**9,
                         device=agent.features.device)
    try:
        track = args.seed
        while True:
            for t, step in enumerate(drive(env, agent, track, args.max_steps)):
                # the agent encoded its last decision frame: agent.features.z
                if t == 0:
                    dream.reset([track], z=agent.features.z)
                row = np.stack([step.frame, vae.decode_frames(agent.features.z)[0], vae.decode_frames(dream.z)[0]])
                yield overlay(frames_grid([row], scale=4), [f"real | reconstruction | dream   step {t}"])
                if t % agent.action_repeat == 0:  # a decision frame: the dream steps once per decision
                    dream.step(torch.from_numpy(step.action)[None])
            track += 1
    finally:
        env.close()


def write_video(path: Path, frames: Iterator[np.ndarray], steps: int, fps: int, scale: float) -> tuple[int, int]:
    """Write `steps` frames to path (.gif or .mp4) through a temporary file; returns the frame (height, width)."""
    import imageio.v2 as imageio

    gif = path.suffix.lower() == ".gif"
    size = None
    with atomic_path(path) as temp:
        writer = (imageio.get_writer(temp, mode="I", duration=1000 / fps, loop=0) if gif else
                  imageio.get_writer(temp, fps=fps, codec="libx264", quality=7, macro_block_size=1,
                                     pixelformat="yuv420p"))
        with writer:
            for frame in tqdm(frames, total=steps, desc=f"video {path.name}", unit="frame", dynamic_ncols=True):
                if scale != 1.0:
                    frame = cv2.resize(frame, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                if not gif:  # yuv420p needs even sides
                    frame = frame[:frame.shape[0] // 2 * 2, :frame.shape[1] // 2 * 2]
                size = frame.shape[:2]
                writer.append_data(frame)
                steps -= 1
                if steps == 0:
                    break
    return size


def main(args: Args) -> None:
    if min(args.steps, args.fps, args.max_steps) < 1 or args.scale <= 0:
        raise UserError("--steps, --fps and --max-steps must be at least 1, --scale positive")
    if args.out.suffix.lower() not in (".mp4", ".gif"):
        raise UserError(f"--out {args.out}: the video must end in .mp4 or .gif")
    ckpt_dir, controller = agent_dir_and_controller(args.ckpt_dir, args.controller)
    device = pick_device(args.device)
    agent = load_agent(ckpt_dir, controller, device)
    vae, world_model, checkpoint = load_vae_and_world_model(ckpt_dir, device)
    frames = {"play": lambda: play_frames(args, agent),
              "dream": lambda: dream_frames(args, agent, vae, world_model, checkpoint["start_bank"]),
              "grid": lambda: grid_frames(args, agent, vae, world_model, checkpoint["start_bank"])}[args.mode]()
    height, width = write_video(args.out, frames, args.steps, args.fps, args.scale)
    print(f"{args.steps} frames of {width}x{height} ({args.mode}, {ckpt_dir} controller {controller}) in {args.out}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
