"""PPO in the real CarRacing-v3 on the agent's features [z, h] (frozen VAE and world model, h carried online).

Reads:  CKPT_DIR/vae.pt and world_model.pt (and with --init-from, the controller a new run starts from).
Writes: CKPT_DIR/controller_ppo.pt (the actor-critic after each update, with the identities of the VAE
        and world model it saw the world through; with --keep-best, once trained, the one whose real check
        scored best), CKPT_DIR/ppo_latest.pt (plus optimizer and reward scaler: re-running resumes),
        TensorBoard logs under LOG_DIR/ppo-<time>/ (training episode returns, losses, KL, explained
        variance, steps/s, and the deterministic policy's real score on EVAL_EPISODES fixed check tracks
        every EVAL_EVERY updates).

NUM_ENVS envs run in WORKERS processes (a gymnasium SyncVectorEnv in each, same-step autoreset); each
decision is held for ACTION_REPEAT frames there (only the last one drawn), its frame preprocessed there,
encoded and remembered here in one batch per decision. ACTION_REPEAT is the world model's (the one clock):
collect and train the world model at the rate the controller should decide at. TOTAL_STEPS counts frames (env
steps). Returns are logged per finished episode, which works with autoreset because the step that ends an episode
carries its last reward.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from envs import RealFeatureEnvs, TrainingShaping
from utils import run_main, setup_stage
from utils_rl import PPOArgs, train_ppo


@dataclass
class Args(PPOArgs):
    num_envs: int = 16
    """envs stepped together, spread over WORKERS processes"""
    threads: int = 1
    """torch CPU threads of this process (the env workers take the cores)"""
    no_progress_frames: int = 100
    """end a training episode after this many frames without a new road tile (0: never); not in evaluation"""
    off_road_penalty: float = 0.0
    """subtract this from a training frame's reward while no wheel is on the road (0: off; the logged training
    returns include it, the checks and evaluation do not)"""
    loss_restarts: float = 0.0
    """share of training episodes that restart 10-40 decisions before a place where an earlier one lost the road
    (envs.LossRestarts; 0: off)"""
    env_backend: str = "fast"
    """fast (pixel-exact CarRacing-v3, faster) or gymnasium (stock) for the training envs"""
    train_seed: int = 20_000_000
    """env i starts on track seed TRAIN_SEED + i, then draws its own tracks"""
    init_from: Path | None = None
    """start from this controller's weights (a controller_*.pt on CKPT_DIR's VAE and world model, e.g. a
    dream-trained one) instead of at random; fresh optimizer and reward scaler"""
    keep_best: bool = False
    """ship the controller whose real check (EVAL_EPISODES tracks from EVAL_SEED, every EVAL_EVERY updates and at
    the end) scored best instead of the last one"""


def main(args: Args) -> None:
    device = setup_stage(args)
    shaping = TrainingShaping(args.no_progress_frames, args.off_road_penalty, args.loss_restarts)
    envs = RealFeatureEnvs(args.ckpt_dir, args.num_envs, args.env_backend, args.max_steps,
                           args.train_seed + 1000 * args.seed, device, args.workers, shaping)
    train_ppo(args, envs, "ppo", device, keep_best=args.keep_best, init_from=args.init_from)


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
