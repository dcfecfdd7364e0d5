"""PPO entirely inside the dream: the world model plays CarRacing, the real env is only looked at.

Reads:  CKPT_DIR/vae.pt and world_model.pt; DATA_DIR's episodes at the world model's action repeat (their
        latents, cached per VAE), whose real states start the imagination (`--replay`).
Writes: CKPT_DIR/controller_ppo_dream.pt (the actor-critic after each update, with the identities of the
        VAE and world model), CKPT_DIR/ppo_dream_latest.pt (re-running resumes; in a new world model its
        weights go on training there, see --warm-start), TensorBoard logs under LOG_DIR/ppo_dream-<time>/.
        Every EVAL_EVERY updates the deterministic policy plays EVAL_EPISODES real tracks and as many x 4
        whole dreams: `eval/real_return` beside `eval/dream_return` is the dream-to-real gap as a curve
        (logged, never used to train or to choose).

With --replay (default) each of NUM_ENVS dreams starts from the state (z, h) of a random decision of a
real episode, as the agent saw it, runs HORIZON decisions, and is then cut and restarted from another
real state; PPO bootstraps each cut with its critic (lambda-returns through GAE). Short imagined
stretches anchored in real states leave the policy little room to exploit the model's long-run errors.
With --no-replay dreams are whole episodes from the bank of real episode starts. One step is one
decision of the world model's clock (its action repeat); TOTAL_STEPS counts dream frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from agent import load_vae_and_world_model
from dream import (
    EVAL_DREAM_SEED,
    BatchedDream,
    DreamFeatureEnvs,
    ImaginedFeatureEnvs,
    ReplayStarts,
    dream_return,
    load_replay,
)
from utils import UserError, run_main, setup_stage
from utils_rl import PPOArgs, train_ppo


@dataclass
class Args(PPOArgs):
    data_dir: Path = Path("data")
    """real episodes whose states start the imagination (DATA_DIR/rollouts/*/, at the world model's rate)"""
    replay: bool = True
    """start dreams from states of replayed real episodes and cut them after HORIZON decisions"""
    horizon: int = 16
    """imagined decisions before a dream is cut and its value bootstrapped by the critic (with --replay)"""
    critical_weight: float = 4.0
    """weight of the replayed states around a real loss of the road (the 20 decisions before it and 10 from it)
    when drawing starts, against 1 for the others (with --replay; 1: uniform)"""
    num_envs: int = 1024
    """dreams stepped together"""
    rollout_steps: int = 16
    """decisions per dream between updates"""
    total_steps: int = 13_107_200
    """dream frames over all dreams (200 updates at the defaults; a resumed run trains up to this many)"""
    update_epochs: int = 4
    minibatches: int = 16
    anneal_lr: bool = False
    """decay the learning rate linearly to 0 over total_steps"""
    temperature: float = 1.0
    """dream sampling temperature (higher: a noisier dream that is harder to exploit)"""
    warm_start: bool = True
    """in a new world model (an on-policy round retrained it), go on training the last controller's weights"""
    eval_every: int = 25
    eval_dreams_per_episode: int = 4
    """whole dreams per real check episode (per check, with no real episodes) for the deterministic dream score"""


def main(args: Args) -> dict:
    device = setup_stage(args)
    if args.horizon < 1 or not args.critical_weight > 0:
        raise UserError("--horizon must be at least 1 and --critical-weight positive")
    vae, world_model, checkpoint = load_vae_and_world_model(args.ckpt_dir, device)
    bank = checkpoint["start_bank"]

    def make_dream(num_envs: int) -> BatchedDream:
        return BatchedDream(world_model, bank["mu"], bank["logvar"], num_envs, args.temperature, args.max_steps, device,
                            args.precision)

    eval_dream = make_dream(max(1, args.eval_episodes) * args.eval_dreams_per_episode)
    eval_seeds = torch.arange(eval_dream.num_envs) + EVAL_DREAM_SEED  # fixed whole dreams from episode starts

    def extra_eval(model) -> dict:
        return {"dream_return": float(dream_return(eval_dream, model, eval_seeds).mean())}

    if args.replay:
        episodes = load_replay(args.data_dir, vae, args.ckpt_dir / "vae.pt", world_model.config.action_repeat, device)
        starts = ReplayStarts(world_model, episodes, device, critical_weight=args.critical_weight)
        print(f"imagination from {len(starts):,} real states of {len(episodes)} episodes, "
              f"{args.horizon} decisions each" + (f"; {starts.critical_share:.1%} of the states are around a loss "
                                                 f"of the road, drawn x{args.critical_weight:g}"
                                                 if args.critical_weight != 1 else ""))
        envs = ImaginedFeatureEnvs(make_dream(args.num_envs), starts, args.horizon, args.seed)
    else:
        envs = DreamFeatureEnvs(make_dream(args.num_envs), args.seed)
    return train_ppo(args, envs, "ppo_dream", device, extra_eval, warm_start=args.warm_start)


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
