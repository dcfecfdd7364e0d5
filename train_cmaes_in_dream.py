"""Evolve the original linear controller with CMA-ES entirely inside the dream.

Reads:  CKPT_DIR/vae.pt and world_model.pt.
Writes: CKPT_DIR/controller_cmaes.pt (the CMA-ES mean after each generation, with the identities of
        the VAE and world model it was evolved in), CKPT_DIR/cmaes_latest.pt (the evolution state:
        re-running resumes), TensorBoard logs under LOG_DIR/cmaes-<time>/ (dream fitness best / mean
        per generation, and the real-env score of the mean every EVAL_EVERY generations).

Each generation the population's POPSIZE x ROLLOUTS dreams run as one BatchedDream: one tensor pass
per step for every candidate. All candidates of a generation dream on the same seeds (common random
numbers), so they are ranked on the same luck. The fitness is the mean dream return; the real env
is only looked at, never learned from.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import cma
import numpy as np
import torch
from tqdm import tqdm

from actor_critic import ControllerConfig, LinearController, population_actions
from utils import (UserError, checkpoint_identity, controller_path, load_vae_and_world_model, plain,
                   resume_controller_checkpoint, run_main, save_checkpoint, setup_stage)
from dream import BatchedDream, dream_return, run_seeds
from utils_rl import ControllerStageArgs, evaluate_agent


@dataclass
class Args(ControllerStageArgs):
    generations: int = 100
    """total generations (a resumed run evolves up to this many)"""
    popsize: int = 64
    rollouts: int = 16
    """dream episodes per candidate"""
    temperature: float = 1.0
    """dream sampling temperature (higher: a harder, noisier dream that is harder to exploit)"""
    sigma0: float = 0.1
    """initial CMA-ES step size"""
    eval_every: int = 10
    """play the CMA-ES mean in the real env every this many generations (0: never)"""


@torch.no_grad()
def dream_fitness(dream: BatchedDream, solutions: torch.Tensor, rollouts: int, seeds: torch.Tensor) -> torch.Tensor:
    """Mean dream return of each candidate: solutions (P, n), seeds (P * rollouts,) -> (P,)."""
    popsize = solutions.shape[0]

    def act(obs: torch.Tensor) -> torch.Tensor:
        return population_actions(solutions, obs.view(popsize, rollouts, -1)).view(popsize * rollouts, 3)

    return dream_return(dream, act, seeds).view(popsize, rollouts).mean(1)


def generation_seeds(run_seed: int, generation: int, popsize: int, rollouts: int) -> torch.Tensor:
    """The dream seeds of a generation, (popsize * rollouts,): rollout r of every candidate dreams on the same
    seed (common random numbers), and every generation and every --seed on new ones."""
    return run_seeds(run_seed, generation * rollouts, rollouts).repeat(popsize)


def main(args: Args) -> None:
    device = setup_stage(args)
    if min(args.generations, args.popsize, args.rollouts, args.max_steps) < 1 or args.popsize < 2:
        raise UserError("--generations, --rollouts and --max-steps must be at least 1, --popsize at least 2")
    _, world_model, wm_checkpoint = load_vae_and_world_model(args.ckpt_dir, device)  # (checks they belong together)
    identities = {"vae": checkpoint_identity(args.ckpt_dir / "vae.pt"),
                  "world_model": checkpoint_identity(args.ckpt_dir / "world_model.pt")}
    config = ControllerConfig(kind="linear", obs_dim=world_model.config.latent_dim + world_model.config.hidden_dim,
                              action_repeat=world_model.config.action_repeat)
    controller = LinearController(config)
    latest_path, out_path = args.ckpt_dir / "cmaes_latest.pt", controller_path(args.ckpt_dir, "cmaes")

    es, start_gen, best_fitness = None, 0, -math.inf
    log_dir = args.log_dir / f"cmaes-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoint = resume_controller_checkpoint(latest_path, args.fresh, identities["world_model"]["sha256"], config,
                                              "train_cmaes_in_dream.py")
    if checkpoint:
        es = pickle.loads(checkpoint["es"])  # our own evolution state, written by this script
        start_gen, best_fitness, log_dir = checkpoint["generation"], checkpoint["best_fitness"], Path(checkpoint["log_dir"])
        print(f"resuming from {latest_path}: generation {start_gen}, best dream fitness {best_fitness:.1f}")
    if start_gen >= args.generations:
        print(f"{latest_path} has already evolved {start_gen} generations; nothing to do")
        return
    if es is None:
        es = cma.CMAEvolutionStrategy(np.zeros(LinearController.num_params(config.obs_dim)), args.sigma0,
                                      {"popsize": args.popsize, "seed": args.seed + 1, "verbose": -9})

    bank = wm_checkpoint["start_bank"]
    dream = BatchedDream(world_model, bank["mu"], bank["logvar"], args.popsize * args.rollouts, args.temperature,
                         args.max_steps, device)
    print(f"CMA-ES: {es.N} parameters, population {args.popsize} x {args.rollouts} dreams of up to {args.max_steps} "
          f"frames ({dream.max_steps} decisions of {dream.action_repeat}) at temperature {args.temperature} on {device}; logs in {log_dir}")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    writer.add_text("args", str(plain(args)))
    bar = tqdm(range(start_gen, args.generations), desc="cmaes", unit="gen", dynamic_ncols=True,
               initial=start_gen, total=args.generations)
    for generation in bar:
        gen_start = time.perf_counter()
        solutions = np.array(es.ask())
        seeds = generation_seeds(args.seed, generation, args.popsize, args.rollouts)
        fitness = dream_fitness(dream, torch.as_tensor(solutions, dtype=torch.float32, device=device), args.rollouts,
                                seeds.to(device)).cpu().numpy()
        if not np.isfinite(fitness).all():
            raise UserError(f"dream fitness became non-finite at generation {generation + 1}; "
                            f"the last good checkpoint is {latest_path}")
        es.tell(list(solutions), list(-fitness))  # cma minimises
        best_fitness = max(best_fitness, float(fitness.max()))
        seconds = time.perf_counter() - gen_start
        metrics = {"fitness_best": float(fitness.max()), "fitness_mean": float(fitness.mean()),
                   "sigma": float(es.sigma), "seconds": seconds}
        for name, value in metrics.items():
            writer.add_scalar(f"cmaes/{name}", value, generation + 1)

        controller.set_flat(torch.as_tensor(es.mean, dtype=torch.float32))
        checkpoint = {"config": plain(config), "state_dict": controller.state_dict(), "args": plain(args),
                      "generation": generation + 1, "metrics": metrics, "best_fitness": best_fitness,
                      "log_dir": str(log_dir), **identities}
        save_checkpoint(out_path, checkpoint)
        save_checkpoint(latest_path, {**checkpoint, "es": es.pickle_dumps()})
        if args.eval_every and (generation + 1) % args.eval_every == 0:
            real = evaluate_agent(args.ckpt_dir, "cmaes", args.eval_episodes, args.eval_seed, args.workers,
                                  progress=False)
            writer.add_scalar("real/mean_return", real["mean"], generation + 1)
            bar.write(f"generation {generation + 1}: real env {real['mean']:.1f} ± {real['std']:.1f} over "
                      f"{args.eval_episodes} tracks (dream best {fitness.max():.1f}, mean {fitness.mean():.1f})")
        bar.set_postfix(best=f"{fitness.max():.1f}", mean=f"{fitness.mean():.1f}", sigma=f"{es.sigma:.3f}",
                        s_gen=f"{seconds:.1f}", refresh=False)
    writer.close()
    print(f"controller (CMA-ES mean) in {out_path}; best dream fitness {best_fitness:.1f}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
