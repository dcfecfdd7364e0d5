"""PPO entirely inside the dream: the world model plays CarRacing, the real env is only looked at.

Reads:  CKPT_DIR/vae.pt and world_model.pt (with its bank of real episode starts).
Writes: CKPT_DIR/controller_ppo_dream.pt (the actor-critic after each update, with the identities of the
        VAE and world model), CKPT_DIR/ppo_dream_latest.pt (re-running resumes), TensorBoard logs under
        LOG_DIR/ppo_dream-<time>/. Every EVAL_EVERY updates the deterministic policy plays EVAL_EPISODES
        real tracks and as many x 4 dreams: `eval/real_return` beside `eval/dream_return` is the
        dream-to-real gap as a curve.

NUM_ENVS dreams step together as one BatchedDream (one tensor pass per step), restarted on their own
seeds as they end; temperature > 1 makes a noisier dream that is harder to exploit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from utils import load_vae_and_world_model, run_main, setup_stage
from utils_rl import BatchedDream, DreamFeatureEnvs, PPOArgs, train_ppo


@dataclass
class Args(PPOArgs):
    num_envs: int = 64
    """dreams stepped together"""
    total_steps: int = 5_000_000
    temperature: float = 1.0
    """dream sampling temperature"""
    eval_dreams_per_episode: int = 4
    """dreams per real check episode for the deterministic dream score"""


@torch.no_grad()
def dream_score(model, dream: BatchedDream, seeds: torch.Tensor) -> float:
    """Mean return of the deterministic policy over dreams with the given seeds (one each)."""
    obs = dream.reset(seeds)
    returns = torch.zeros(dream.num_envs, device=obs.device)
    alive = torch.ones(dream.num_envs, dtype=torch.bool, device=obs.device)
    while alive.any():
        obs, reward, terminated, truncated = dream.step(model(obs))
        returns += reward * alive
        alive &= ~(terminated | truncated)
    return float(returns.mean())


def main(args: Args) -> None:
    device = setup_stage(args)
    _, world_model, checkpoint = load_vae_and_world_model(args.ckpt_dir, device)
    bank = checkpoint["start_bank"]

    def make_dream(num_envs: int) -> BatchedDream:
        return BatchedDream(world_model, bank["mu"], bank["logvar"], num_envs, args.temperature, args.max_steps, device)

    eval_dream = make_dream(max(1, args.eval_episodes * args.eval_dreams_per_episode))
    eval_seeds = torch.arange(eval_dream.num_envs) + 2**62  # fixed dreams, apart from the training seeds

    def extra_eval(model) -> dict:
        return {"dream_return": dream_score(model, eval_dream, eval_seeds)}

    train_ppo(args, DreamFeatureEnvs(make_dream(args.num_envs), args.seed), "ppo_dream", device, extra_eval)


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
