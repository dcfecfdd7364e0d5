"""PPO in the real CarRacing-v3 on the agent's features [z, h] (frozen VAE and world model, h carried online).

Reads:  CKPT_DIR/vae.pt and world_model.pt (and with --init-from, the controller a new run starts from; with
        --partner, the frozen controller and the world_model.pt beside it that it plays with).
Writes: CKPT_DIR/controller_ppo.pt (the actor-critic after each update, with the identities of the VAE
        and world model it saw the world through; with --keep-best, once trained, the one whose real check
        scored best), CKPT_DIR/ppo_latest.pt (plus optimizer and reward scaler: re-running resumes),
        TensorBoard logs under LOG_DIR/ppo-<time>/ (training episode returns, losses, KL, explained
        variance, steps/s, and the deterministic policy's real score on EVAL_EPISODES fixed check tracks
        every EVAL_EVERY updates). With --partner also CKPT_DIR/controller_ensemble.pt and CKPT_DIR/member1/
        (make_ensemble.py: the pair the controller was trained in, what evaluate.py then plays by default; a
        partner in a subdir of CKPT_DIR is named where it lies, not copied; the checks play the pair as well as
        the controller alone).

NUM_ENVS envs run in WORKERS processes (a gymnasium SyncVectorEnv in each, same-step autoreset); each
decision is held for ACTION_REPEAT frames there (only the last one drawn), its frame preprocessed there,
encoded and remembered here in one batch per decision. ACTION_REPEAT is the world model's (the one clock):
collect and train the world model at the rate the controller should decide at. TOTAL_STEPS counts frames (env
steps). Returns are logged per finished episode, which works with autoreset because the step that ends an episode
carries its last reward.

With --partner the action taken in training is the mean of this controller's and the partner's deterministic one,
as the two play as an ensemble (make_ensemble.py, equal weights): the controller learns its part of the pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import make_ensemble
from agent import CONTROLLER_SCRIPTS
from envs import RealFeatureEnvs, TrainingShaping
from rollouts import evaluate_agent
from utils import UserError, run_main, setup_stage
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
    partner: Path | None = None
    """train beside this frozen controller (a controller_*.pt seen through CKPT_DIR's VAE, its world_model.pt
    beside it): the action taken is the mean of the two, and CKPT_DIR ends with the pair as its ensemble"""


def write_pair(args: Args) -> None:
    """CKPT_DIR/controller_ensemble.pt: this run's PPO controller and its partner, as make_ensemble.py makes it."""
    make_ensemble.main(make_ensemble.Args(members=[args.ckpt_dir, args.partner.parent], out_dir=args.ckpt_dir,
                                          controller=["ppo", partner_name(args.partner)]))


def partner_name(path: Path) -> str:
    """controller_<name>.pt -> name, one of the controllers an ensemble can hold."""
    name = path.stem.removeprefix("controller_")
    if path.suffix != ".pt" or name == path.stem or name not in CONTROLLER_SCRIPTS or name == "ensemble":
        raise UserError(f"--partner {path} is not a controller_<name>.pt of a single controller "
                        f"({', '.join(n for n in CONTROLLER_SCRIPTS if n != 'ensemble')})")
    return name


def main(args: Args) -> None:
    if args.partner is not None:
        partner_name(args.partner)
        if args.partner.resolve().parent == args.ckpt_dir.resolve():
            raise UserError(f"--partner {args.partner} lies in --ckpt-dir, whose world model and controller_ppo.pt "
                            "are this run's: give the partner a dir of its own (or a subdir, as make dream's)")
        if args.keep_best:
            raise UserError("--keep-best picks by the controller's own checks, not the pair's: not with --partner")
    device = setup_stage(args)
    shaping = TrainingShaping(args.no_progress_frames, args.off_road_penalty, args.loss_restarts)
    envs = RealFeatureEnvs(args.ckpt_dir, args.num_envs, args.env_backend, args.max_steps,
                           args.train_seed + 1000 * args.seed, device, args.workers, shaping, args.partner)

    def pair_check(model) -> dict:  # (the loop has just saved controller_ppo.pt: the pair of this update)
        write_pair(args)
        real = evaluate_agent(args.ckpt_dir, "ensemble", args.eval_episodes, args.eval_seed, args.workers,
                              args.max_steps, progress=False, ray_address=args.ray_address)
        return {"pair_real_return": real["mean"]}

    pair = args.partner is not None
    train_ppo(args, envs, "ppo", device, extra_eval=pair_check if pair and args.eval_episodes else None,
              keep_best=args.keep_best, init_from=args.init_from, partner=envs.partner_identity)
    if pair:
        write_pair(args)


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
