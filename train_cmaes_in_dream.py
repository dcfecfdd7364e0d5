"""Evolve the original linear controller with CMA-ES entirely inside the dream.

Reads:  CKPT_DIR/vae.pt and world_model.pt; with --replay or --init-from-agent, DATA_DIR's episodes (their latents,
        cached per VAE).
Writes: CKPT_DIR/controller_cmaes.pt (the CMA-ES mean, or the mean of the --evolutions' means, after each
        generation, with the identities of the VAE and world model it was evolved in), CKPT_DIR/cmaes_latest.pt
        (the evolution states and the --critic's weights: re-running resumes), TensorBoard logs under
        LOG_DIR/cmaes-<time>/ (dream fitness best / mean per generation, and the real-env score of the
        controller every EVAL_EVERY generations).

Each generation the population's POPSIZE x ROLLOUTS dreams run as one BatchedDream: one tensor pass
per step for every candidate. All candidates of a generation dream on the same seeds (common random
numbers), so they are ranked on the same luck. The fitness is the mean dream return; the real env
is only looked at, never learned from. Dreams start from the world model's bank of episode starts and
run whole episodes, or with --replay from the states of replayed real decisions for HORIZON decisions.
With --critic the fitness is the discounted return (GAMMA) plus the discounted value of where each cut dream
ends, from a critic (an MLP on [z, h]) fitted after every generation on the lambda-returns of that
generation's dreams; it rides in cmaes_latest.pt, so a resumed run goes on with it. With --value-from DIR the
value of where a cut dream ends comes instead from the critic of a PPO agent trained in the same dream
(DIR/ppo_dream_latest.pt, e.g. the dream loop's last round), fixed: the value of a state to a driver that
learned in this dream, not to the population's own slow drivers. With --init-from-agent DIR every evolution
starts from a linear controller fitted to DIR's dream-trained PPO agent (DIR/controller_ppo_dream.pt, of this world
model): least squares on its deterministic actions over INIT_DREAMS dreams of HORIZON decisions from the replayed
starts (run seeds -INIT_DREAMS .. -1, apart from every generation's), also when the evolutions dream whole episodes
(--no-replay). Nothing real but those starts enters the fit.
With --evolutions K, K independent evolutions (seeds SEED .. SEED + K - 1, each asking and dreaming exactly what
the run alone with its --seed would) advance side by side in one BatchedDream, and the controller is the mean of
their K means: still one linear controller, with less of any one evolution's luck in it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import cma
import cma.utilities.utils as cma_utils
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from actor_critic import ActorCritic, ControllerConfig, DreamCritic, LinearController, ScaledValue
from agent import controller_path, load_controller, load_vae_and_world_model
from dream import (
    BatchedDream,
    ReplayStarts,
    counter_uniform,
    dream_fitness,
    dream_return,
    load_replay,
    population_fitness_on_cluster,
    run_seeds,
)
from rollouts import evaluate_agent
from utils import (
    UserError,
    checkpoint_identity,
    plain,
    resume_controller_checkpoint,
    run_main,
    save_checkpoint,
    save_stage,
    setup_stage,
    stage_checkpoint,
)
from utils_rl import ControllerStageArgs, fit_critic


@dataclass
class Args(ControllerStageArgs):
    generations: int = 100
    """total generations (a resumed run evolves up to this many)"""
    popsize: int = 64
    """candidates per generation"""
    rollouts: int = 16
    """dream episodes per candidate"""
    temperature: float = 1.0
    """dream sampling temperature (higher: a harder, noisier dream that is harder to exploit)"""
    sigma0: float = 0.1
    """initial CMA-ES step size"""
    eval_every: int = 10
    """play the CMA-ES mean in the real env every this many generations (0: never)"""
    replay: bool = True
    """start each dream from the state of a replayed real decision and cut it after HORIZON decisions (as PPO
    in imagination does); the fitness is then the mean return of those stretches"""
    horizon: int = 50
    """decisions per dream with --replay, and per dream of the --init-from-agent fit"""
    critical_weight: float = 1.0
    """weight of the real states around a loss of the road when replayed starts are drawn (with --replay, and for the
    --init-from-agent fit) (1: uniform)"""
    critic: bool = False
    """pay each dream cut after HORIZON decisions the value of where it ends, from a critic fitted every generation
    on the population's own dreams (lambda-returns); the fitness is then the discounted return plus that value"""
    gamma: float = 0.99
    """discount of the fitness and the critic's returns, with --critic"""
    critic_lambda: float = 0.95
    """lambda of the critic's targets, with --critic"""
    value_from: Path | None = None
    """a dir whose ppo_dream_latest.pt (PPO trained in this same world model) lends its critic, fixed, to pay each
    cut dream for where it ends; the fitness is then the discounted return (GAMMA) plus that value"""
    init_from_agent: Path | None = None
    """start the evolutions from a linear fit of the dream-trained PPO agent in DIR (controller_ppo_dream.pt, this
    world model) to its own actions in dreams from the replayed starts, instead of from zero"""
    init_dreams: int = 8192
    """dreams of HORIZON decisions whose states the --init-from-agent fit uses"""
    evolutions: int = 1
    """independent evolutions side by side (seeds SEED .. SEED + EVOLUTIONS - 1); the controller is the mean of their
    means (one linear controller)"""
    data_dir: Path = Path("data")
    """real episodes whose states start the dreams with --replay, and those of the --init-from-agent fit
    (DATA_DIR/rollouts/*/)"""


def generation_starts(starts: ReplayStarts, run_seed: int, generation: int, popsize: int,
                      rollouts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The replayed start states of a generation: rollout r of every candidate starts from the same real state
    (common random numbers), each generation and --seed from others. z (P * R, latent), state (P * R, size)."""
    uniform = counter_uniform(run_seeds(run_seed, generation * rollouts, rollouts), torch.full((rollouts,), -3), 1)
    z, state = starts.sample(uniform[:, 0])
    return z.repeat(popsize, 1), state.repeat(popsize, 1)


def es_state(es: cma.CMAEvolutionStrategy) -> dict:
    """The evolution state as plain numbers and tensors, keyed by attribute path ("sm.C", "adapt_sigma.ps", ...):
    every number and numeric array in the ES's object graph, plus numpy's global generator that cma samples
    from. Stored in the checkpoint instead of a pickle (loading a pickle executes code from the file)."""
    state, seen = {}, set()

    def walk(obj, prefix: str) -> None:
        seen.add(id(obj))
        for name, value in vars(obj).items():
            path = prefix + name
            if name in ("timer", "logger"):  # wall-clock bookkeeping and file logging: rebuilt, not restored
                continue
            if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
                state[path] = torch.from_numpy(value.copy())
            elif isinstance(value, (bool, int, float, np.bool_, np.integer, np.floating)):
                state[path] = value.item() if isinstance(value, np.generic) else value
            elif type(value) is list and all(isinstance(item, (int, float)) for item in value):
                state[path] = list(value)
            elif type(value) is list and all(isinstance(item, np.ndarray) and item.dtype.kind in "fiub"
                                             for item in value):  # e.g. TPA's mean-shift directions
                state[path] = {"arrays": [torch.from_numpy(item.copy()) for item in value]}
            elif (type(value).__module__.startswith("cma") and hasattr(value, "__dict__")
                  and not isinstance(value, dict) and id(value) not in seen):
                walk(value, path + ".")

    walk(es, "")
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {"attributes": state, "numpy_random": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                                                  "position": position, "has_gauss": has_gauss, "cached": cached}}


def restore_es(es: cma.CMAEvolutionStrategy, state: dict) -> cma.CMAEvolutionStrategy:
    """Put `es_state(...)` back into a fresh ES made with the same settings: it then asks what the saved
    one would have asked (tested against an uninterrupted run)."""
    for path, value in state["attributes"].items():
        *parents, name = path.split(".")
        owner = es
        for parent in parents:
            owner = getattr(owner, parent, None)
        if owner is None:
            raise UserError(f"the saved CMA-ES state has {path}, which this version of cma does not: re-run with "
                            "--fresh")
        old = getattr(owner, name, None)
        if isinstance(value, torch.Tensor):
            value = value.numpy().copy()
        elif isinstance(value, dict):  # a list of arrays
            value = [item.numpy().copy() for item in value["arrays"]]
        elif isinstance(old, np.generic):
            value = type(old)(value)
        setattr(owner, name, value)
    es.timer = cma_utils.ElapsedWCTime()  # ask() makes it on the first generation only
    rng = state["numpy_random"]
    np.random.set_state((rng["kind"], rng["keys"].numpy().astype(np.uint32), rng["position"], rng["has_gauss"],
                         rng["cached"]))
    return es


def load_dream_value(ckpt_dir: Path, world_model_path: Path, device) -> ScaledValue:
    """The critic of CKPT_DIR/ppo_dream_latest.pt in reward units, checked to be trained in WORLD_MODEL_PATH's
    dream (and on the VAE beside it)."""
    path = Path(ckpt_dir) / "ppo_dream_latest.pt"
    agent, config = load_controller(path, world_model_path.parent, world_model_path, device,
                                    script="train_ppo_in_dream.py (or train_dream_loop.py) on this world model")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if config.kind != "actor_critic" or "reward_scaler" not in checkpoint:
        raise UserError(f"{path} is not a PPO agent's resumable checkpoint (no critic or reward scale)")
    reward_std = float(torch.sqrt(checkpoint["reward_scaler"]["var"] + 1e-8))
    return ScaledValue(agent, reward_std).to(device).eval()


def distill_linear(agent, world_model, bank: dict, starts: ReplayStarts, dreams: int, horizon: int, run_seed: int,
                   device, steps: int = 2000, batch: int = 4096) -> np.ndarray:
    """The linear controller closest to a dream-trained agent: its flat parameters [W (3 x obs_dim), b] minimising the
    squared error of tanh(W [z, h] + b) to the agent's deterministic unit action (its distribution's mode) on every
    state of DREAMS dreams the agent drives for HORIZON decisions from replayed starts (run seeds -DREAMS .. -1)."""
    seeds = run_seeds(run_seed, -dreams, dreams, device)
    z, state = starts.sample(counter_uniform(seeds, torch.full((dreams,), -3, device=device), 1)[:, 0])
    dream = BatchedDream(world_model, bank["mu"], bank["logvar"], dreams, 1.0,
                         horizon * world_model.config.action_repeat, device)
    trajectory = {}
    dream_return(dream, agent, seeds, z, state, trajectory=trajectory)
    with torch.no_grad():
        obs = trajectory["obs"][:-1][trajectory["alive"]]  # (N, obs_dim): every state the agent acted in
        target = agent.policy(obs).mode()  # (N, 3) unit actions in [-1, 1], what squash's tanh must match
    linear = nn.Linear(obs.shape[1], 3).to(device)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2)
    generator = torch.Generator(device="cpu").manual_seed(run_seed)
    for _ in range(steps):
        pick = torch.randint(len(obs), (batch,), generator=generator).to(obs.device)
        loss = (torch.tanh(linear(obs[pick])) - target[pick]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.cat([linear.weight.detach().flatten(), linear.bias.detach()]).cpu().double().numpy()


def new_es(num_params: int, args: Args, seed: int | None = None, x0: np.ndarray | None = None
           ) -> cma.CMAEvolutionStrategy:
    seed = args.seed if seed is None else seed
    return cma.CMAEvolutionStrategy(np.zeros(num_params) if x0 is None else x0, args.sigma0,
                                    {"popsize": args.popsize, "seed": seed + 1, "verbose": -9})


class Evolution:
    """One CMA-ES with a numpy generator of its own: cma samples from numpy's global one, so each evolution's is
    swapped in around its ask and tell, and several evolutions side by side each ask what it would alone."""

    def __init__(self, es: cma.CMAEvolutionStrategy):
        self.es, self.numpy_state = es, np.random.get_state()  # as new_es or restore_es left it

    def _swapped(self, call):
        np.random.set_state(self.numpy_state)
        result = call()
        self.numpy_state = np.random.get_state()
        return result

    def ask(self) -> np.ndarray:
        return np.array(self._swapped(self.es.ask))

    def tell(self, solutions: np.ndarray, fitness: np.ndarray) -> None:
        self._swapped(lambda: self.es.tell(list(solutions), list(-fitness)))  # cma minimises

    def state(self) -> dict:
        return self._swapped(lambda: es_state(self.es))


def generation_seeds(run_seed: int, generation: int, popsize: int, rollouts: int) -> torch.Tensor:
    """The dream seeds of a generation, (popsize * rollouts,): rollout r of every candidate dreams on the same
    seed (common random numbers), and every generation and every --seed on new ones."""
    return run_seeds(run_seed, generation * rollouts, rollouts).repeat(popsize)


def main(args: Args) -> None:
    device = setup_stage(args)
    fitted_only = args.generations == 0 and args.init_from_agent is not None  # the fitted start is the controller
    if ((args.generations < 1 and not fitted_only) or args.popsize < 2
            or min(args.rollouts, args.max_steps, args.evolutions) < 1):
        raise UserError("--generations (0 only with --init-from-agent), --rollouts, --max-steps and --evolutions must "
                        "be at least 1, --popsize at least 2")
    vae, world_model, wm_checkpoint = load_vae_and_world_model(args.ckpt_dir, device)  # (checks they belong together)
    if args.horizon < 1 or not args.critical_weight > 0:
        raise UserError("--horizon must be at least 1 and --critical-weight positive")
    if args.critic and args.ray_address:
        raise UserError("--critic is fitted in this process: run it without --ray-address")
    if args.value_from is not None and (args.critic or args.ray_address or not args.replay):
        raise UserError("--value-from pays dreams cut by --replay, in this process: run it with --replay, "
                        "without --critic and without --ray-address")
    if args.init_from_agent is not None and args.init_dreams < 1:
        raise UserError("--init-from-agent fits on --init-dreams dreams: give at least 1")
    if args.critic and args.evolutions > 1:
        raise UserError("--critic is fitted on one evolution's dreams: run it with --evolutions 1")
    if not (0 < args.gamma <= 1 and 0 <= args.critic_lambda <= 1):
        raise UserError("--gamma must be in (0, 1] and --critic-lambda in [0, 1]")
    identities = {"vae": checkpoint_identity(args.ckpt_dir / "vae.pt"),
                  "world_model": checkpoint_identity(args.ckpt_dir / "world_model.pt")}
    config = ControllerConfig(kind="linear", obs_dim=world_model.controller_input_dim,
                              action_repeat=world_model.config.action_repeat)
    controller = LinearController(config)
    latest_path, out_path = args.ckpt_dir / "cmaes_latest.pt", controller_path(args.ckpt_dir, "cmaes")

    evolutions, start_gen, best_fitness = None, 0, -math.inf
    critic = DreamCritic(config.obs_dim).to(device) if args.critic else None
    fixed_value = (load_dream_value(args.value_from, args.ckpt_dir / "world_model.pt", device)
                   if args.value_from is not None else None)
    cut_value = critic if critic is not None else fixed_value  # what pays a cut dream for where it ends, if anything
    critic_optimizer = torch.optim.Adam(critic.parameters(), lr=3e-4) if critic is not None else None
    log_dir = args.log_dir / f"cmaes-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoint = None if fitted_only else resume_controller_checkpoint(
        latest_path, out_path, args.fresh, identities["world_model"]["sha256"], config, "train_cmaes_in_dream.py")
    if checkpoint:
        # (runs from before --critical-weight drew uniformly, from before --critic had none)
        saved = ({"critical_weight": 1.0, "critic": False, "gamma": 0.99, "critic_lambda": 0.95, "evolutions": 1,
                  "value_from": None, "init_from_agent": None, "init_dreams": 8192} | checkpoint["args"])
        changed = [name for name in ("popsize", "sigma0", "seed", "rollouts", "temperature", "max_steps", "replay",
                                     "horizon", "critical_weight", "critic", "gamma", "critic_lambda", "evolutions",
                                     "value_from", "init_from_agent", "init_dreams")
                   if saved.get(name) != plain(getattr(args, name))]  # what the fitness depends on
        if changed:
            raise UserError(f"{latest_path} was evolved with other {', '.join(changed)} "
                            f"({', '.join(f'{name}={saved.get(name)}' for name in changed)}): use the same or --fresh")
        states = checkpoint.get("es_states") or ([checkpoint["es_state"]] if "es_state" in checkpoint else None)
        if states is None:
            raise UserError(f"{latest_path} holds its evolution state in a form this version no longer reads "
                            "(a pickle): re-run with --fresh")
        evolutions = [Evolution(restore_es(new_es(LinearController.num_params(config.obs_dim), args, args.seed + k),
                                           state)) for k, state in enumerate(states)]
        if critic is not None:
            critic.load_state_dict(checkpoint["critic"])
            critic_optimizer.load_state_dict(checkpoint["critic_optimizer"])
        start_gen, best_fitness = checkpoint["generation"], checkpoint["best_fitness"]
        log_dir = Path(checkpoint["log_dir"])
        print(f"resuming from {latest_path}: generation {start_gen}, best dream fitness {best_fitness:.1f}")
    if start_gen >= args.generations and not fitted_only:
        print(f"{latest_path} has already evolved {start_gen} generations; nothing to do")
        return
    seeds_of_evolutions = [args.seed + k for k in range(args.evolutions)]

    bank, starts = wm_checkpoint["start_bank"], None
    dream_frames = args.max_steps
    if args.replay or (args.init_from_agent is not None and evolutions is None):  # (the fit's dreams too)
        episodes = load_replay(args.data_dir, vae, args.ckpt_dir / "vae.pt", world_model.config.action_repeat, device)
        starts = ReplayStarts(world_model, episodes, device, critical_weight=args.critical_weight)
    if args.replay:
        dream_frames = min(args.max_steps, args.horizon * world_model.config.action_repeat)
        print(f"dreams from {len(starts):,} replayed real states of {len(episodes)} episodes, "
              f"{args.horizon} decisions each")
    if evolutions is None:
        x0 = None
        if args.init_from_agent is not None:
            agent, _ = load_controller(Path(args.init_from_agent) / "controller_ppo_dream.pt", args.ckpt_dir,
                                       args.ckpt_dir / "world_model.pt", device,
                                       script="train_ppo_in_dream.py (or train_dream_loop.py) on this world model")
            if not isinstance(agent, ActorCritic):
                raise UserError(f"{args.init_from_agent}/controller_ppo_dream.pt is not a PPO agent")
            x0 = distill_linear(agent, world_model, bank, starts, args.init_dreams, args.horizon, args.seed, device)
            if fitted_only:  # (--generations 0: no evolution; written as generation 0, nothing to resume)
                controller.set_flat(torch.as_tensor(x0, dtype=torch.float32))
                save_checkpoint(out_path, stage_checkpoint(config, controller, args, log_dir, generation=0,
                                                           metrics={}, best_fitness=-math.inf, **identities))
                print(f"controller (the linear fit, no generation) in {out_path}")
                return
            print(f"evolutions start from the linear fit of {args.init_from_agent}'s agent "
                  f"on {args.init_dreams} dreams")
        evolutions = [Evolution(new_es(LinearController.num_params(config.obs_dim), args, args.seed + k, x0))
                      for k in range(args.evolutions)]
    dream = BatchedDream(world_model, bank["mu"], bank["logvar"], args.evolutions * args.popsize * args.rollouts,
                         args.temperature, dream_frames, device)
    print(f"CMA-ES: {evolutions[0].es.N} parameters, "
          f"{f'{args.evolutions} evolutions of ' if args.evolutions > 1 else ''}"
          f"population {args.popsize} x {args.rollouts} dreams of up to {dream_frames} "
          f"frames ({dream.max_steps} decisions of {dream.action_repeat}) at temperature {args.temperature} "
          f"on {device}; logs in {log_dir}")
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    writer.add_text("args", str(plain(args)))
    bar = tqdm(range(start_gen, args.generations), desc="cmaes", unit="gen", dynamic_ncols=True,
               initial=start_gen, total=args.generations)
    for generation in bar:
        gen_start = time.perf_counter()
        # evolution k's candidates, seeds and starts are those of the run alone with --seed SEED + k, stacked
        solutions = np.concatenate([evolution.ask() for evolution in evolutions])  # (K * P, n)
        seeds = torch.cat([generation_seeds(seed, generation, args.popsize, args.rollouts)
                           for seed in seeds_of_evolutions])  # (K * P * R,)
        z, state = None, None
        if args.replay:
            z, state = map(torch.cat, zip(*[generation_starts(starts, seed, generation, args.popsize, args.rollouts)
                                            for seed in seeds_of_evolutions]))
        if args.ray_address:  # every evolution's population spread over the cluster's CPUs in one call
            # rollout r of every candidate of an evolution shares its seed and start: ship one set per evolution
            firsts = torch.cat([torch.arange(args.rollouts) + k * args.popsize * args.rollouts
                                for k in range(args.evolutions)])  # (K * R,)
            fitness = population_fitness_on_cluster(
                args.ray_address, args.ckpt_dir / "world_model.pt", solutions, args.rollouts, seeds[firsts],
                args.temperature, dream_frames, *((z[firsts], state[firsts]) if z is not None else ()),
                groups=args.evolutions)
        else:
            trajectory = {} if critic is not None else None
            fitness = dream_fitness(dream, torch.as_tensor(solutions, dtype=torch.float32, device=device),
                                    args.rollouts, seeds.to(device), z, state,
                                    args.gamma if cut_value is not None else 1.0, cut_value, trajectory).cpu().numpy()
        if not np.isfinite(fitness).all():
            raise UserError(f"dream fitness became non-finite at generation {generation + 1}; "
                            f"the last good checkpoint is {latest_path}")
        for k, evolution in enumerate(evolutions):
            part = slice(k * args.popsize, (k + 1) * args.popsize)
            evolution.tell(solutions[part], fitness[part])
        best_fitness = max(best_fitness, float(fitness.max()))
        seconds = time.perf_counter() - gen_start
        sigma = float(np.mean([evolution.es.sigma for evolution in evolutions]))
        metrics = {"fitness_best": float(fitness.max()), "fitness_mean": float(fitness.mean()),
                   "sigma": sigma, "seconds": seconds}
        extras = {"es_states": [evolution.state() for evolution in evolutions]}
        if critic is not None:  # fitted after the fitness, so every candidate of a generation met the same critic
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + generation)
            metrics["critic_loss"] = fit_critic(critic, critic_optimizer, trajectory, args.gamma, args.critic_lambda,
                                                generator)
            extras |= {"critic": critic.state_dict(), "critic_optimizer": critic_optimizer.state_dict()}
        for name, value in metrics.items():
            writer.add_scalar(f"cmaes/{name}", value, generation + 1)

        mean = np.mean([evolution.es.mean for evolution in evolutions], axis=0)  # of the means: one linear controller
        controller.set_flat(torch.as_tensor(mean, dtype=torch.float32))
        checkpoint = stage_checkpoint(config, controller, args, log_dir, generation=generation + 1, metrics=metrics,
                                      best_fitness=best_fitness, **identities)
        save_stage(out_path, latest_path, checkpoint, extras)
        if args.eval_every and (generation + 1) % args.eval_every == 0:
            real = evaluate_agent(args.ckpt_dir, "cmaes", args.eval_episodes, args.eval_seed, args.workers,
                                  progress=False, ray_address=args.ray_address)
            writer.add_scalar("real/mean_return", real["mean"], generation + 1)
            bar.write(f"generation {generation + 1}: real env {real['mean']:.1f} ± {real['std']:.1f} over "
                      f"{args.eval_episodes} tracks (dream best {fitness.max():.1f}, mean {fitness.mean():.1f})")
        bar.set_postfix(best=f"{fitness.max():.1f}", mean=f"{fitness.mean():.1f}", sigma=f"{sigma:.3f}",
                        s_gen=f"{seconds:.1f}", refresh=False)
    writer.close()
    print(f"controller (CMA-ES mean{' of the evolutions' if args.evolutions > 1 else ''}) in {out_path}; "
          f"best dream fitness {best_fitness:.1f}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
