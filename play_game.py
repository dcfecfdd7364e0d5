"""Watch an agent drive CarRacing-v3 in a live window, or drive it yourself with the arrow keys.

Reads:  CKPT_DIR (default: pretrained/, the shipped agent): vae.pt, world_model.pt, controller_<CONTROLLER>.pt
        (and an ensemble's members, make_ensemble.py).
Writes: with --human, each episode you drive as an ordinary episode file,
        DATA_DIR/rollouts/human/ep_<track seed>.npz (usable training data).

Keys: space pauses, r restarts the episode, n skips to the next track, q or Esc quits. With --human:
left/right steer, up accelerates, down brakes. The window shows the env's own 600x400 view with the
episode, step and running score. Without a display the script says so and points to create_video.py;
with SDL_VIDEODRIVER=dummy it runs headless (that is how the tests run it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent import ControllerName, agent_dir_and_controller, load_agent
from envs import make_env
from episodes import episode_path, save_episode
from rollouts import drive, episode_from_steps
from utils import UserError, pick_device, run_main


@dataclass
class Args:
    ckpt_dir: Path | None = None
    """the agent (default: pretrained/); ignored with --human"""
    controller: ControllerName | None = None
    """which controller of CKPT_DIR (default: the first of ensemble, ppo, ppo_dream, cmaes it holds)"""
    episodes: int = 3
    """tracks to play"""
    seed: int = 1_000_000
    """first track seed; episode i plays track SEED + i"""
    max_steps: int = 1000
    """episode length in frames"""
    human: bool = False
    """drive yourself with the arrow keys; episodes are recorded to DATA_DIR/rollouts/human/"""
    data_dir: Path = Path("data")
    """with --human, episodes go to DATA_DIR/rollouts/human/"""
    fps: int = 50
    """frames per second of the window (CarRacing's own rate is 50)"""
    env_backend: str = "fast"
    """fast (pixel-exact CarRacing-v3) or gymnasium (stock)"""
    device: str = "cpu"
    """where the agent's networks run: cpu (the reported scores), auto, cuda or cuda:N"""


def check_display() -> None:
    """pygame with a window, or a one-line error: no display and no SDL dummy driver set."""
    if os.environ.get("SDL_VIDEODRIVER") == "dummy":
        return
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise UserError("no display to open a window on: record a video instead (python create_video.py --mode play), "
                        "or set SDL_VIDEODRIVER=dummy to run without a window")


def human_action(pressed) -> np.ndarray:
    import pygame

    steer = float(pressed[pygame.K_RIGHT]) - float(pressed[pygame.K_LEFT])
    return np.array([steer, 1.0 if pressed[pygame.K_UP] else 0.0, 0.8 if pressed[pygame.K_DOWN] else 0.0], np.float32)


class KeyboardPolicy:
    """You, through the arrow keys held down at each frame (the policy interface of rollouts.drive)."""

    action_repeat = 1

    def reset(self, seed: int) -> None:
        pass  # nothing random to seed: the keys decide

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        import pygame

        return human_action(pygame.key.get_pressed())


def main(args: Args) -> None:
    if min(args.episodes, args.max_steps, args.fps) < 1:
        raise UserError("--episodes, --max-steps and --fps must be at least 1")
    if args.human:
        policy = KeyboardPolicy()
    else:
        ckpt_dir, controller = agent_dir_and_controller(args.ckpt_dir, args.controller)
        policy = load_agent(ckpt_dir, controller, pick_device(args.device))
        print(f"agent: {ckpt_dir} with controller {controller}")
    check_display()
    import pygame

    env = make_env(args.env_backend, args.max_steps, render_mode="rgb_array")
    pygame.display.init()  # not pygame.init(): no audio device is needed (or there, on a server)
    pygame.font.init()
    screen = pygame.display.set_mode((600, 400))
    pygame.display.set_caption("World Models: CarRacing-v3" + (" (you drive)" if args.human else ""))
    font, clock = pygame.font.Font(None, 28), pygame.time.Clock()
    episode, quit_requested = 0, False
    try:
        while episode < args.episodes and not quit_requested:
            track_seed = args.seed + episode
            steps = drive(env, policy, track_seed, args.max_steps)
            record, score, paused, restart, next_track = [], 0.0, False, False, False
            while True:
                for event in pygame.event.get():
                    quit_key = event.type == pygame.KEYDOWN and event.key in (pygame.K_q, pygame.K_ESCAPE)
                    if event.type == pygame.QUIT or quit_key:
                        quit_requested = True
                    elif event.type == pygame.KEYDOWN and event.key == pygame.K_SPACE:
                        paused = not paused
                    elif event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                        restart = True
                    elif event.type == pygame.KEYDOWN and event.key == pygame.K_n:
                        next_track = True
                if quit_requested or restart or next_track:
                    break
                if not paused:
                    step = next(steps)
                    record.append(step)
                    score += step.reward
                    if step.terminated or step.truncated:
                        break
                if record:  # (paused before the first step, the track is not made yet)
                    screen.blit(pygame.surfarray.make_surface(env.render().swapaxes(0, 1)), (0, 0))
                    status = (f"episode {episode + 1}/{args.episodes}  track {track_seed}  step {len(record)}  "
                              f"score {score:.1f}")
                    screen.blit(font.render(status + ("  [paused]" if paused else ""), True, (255, 255, 255)),
                                (10, 8))
                    pygame.display.flip()
                clock.tick(args.fps)
            steps.close()
            if restart:
                continue  # the same track again
            if args.human and record and (record[-1].truncated or record[-1].terminated):
                path = episode_path(args.data_dir, "human", track_seed)
                save_episode(path, episode_from_steps(record, track_seed, action_repeat=1))
                print(f"recorded {len(record)} steps to {path}")
            print(f"episode {episode + 1}: track {track_seed}, {len(record)} steps, score {score:.1f}")
            episode += 1
    finally:
        env.close()
        pygame.quit()


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
