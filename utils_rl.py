"""PPO: generalized advantage estimation, the reward scaler, the clipped update, and the PPO loop shared by
train_ppo.py (real envs, envs.RealFeatureEnvs) and train_ppo_in_dream.py (dreams, dream.py); and `fit_critic`,
the lambda-return fit of the CMA-ES critic (train_cmaes_in_dream.py --critic).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from agent import CONTROLLER_SCRIPTS, load_controller
from rollouts import evaluate_agent
from utils import (
    Precision,
    UserError,
    autocast,
    checkpoint_identity,
    plain,
    resume_controller_checkpoint,
    save_checkpoint,
    save_stage,
    stage_checkpoint,
)


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, last_value: torch.Tensor,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over a rollout of T steps of N envs.

    rewards, values, dones (T, N): dones[t] is set when the episode ended at step t (its value target
    then stops there; a truncation's bootstrap is already folded into its reward); last_value (N,) is
    the value of the observation after the last step. Returns advantages and value targets, (T, N).
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(len(rewards))):
        alive = 1.0 - dones[t].float()
        delta = rewards[t] + gamma * next_value * alive - values[t]
        running = delta + gamma * lam * alive * running
        advantages[t] = running
        next_value = values[t]
    return advantages, advantages + values


def fit_critic(critic: nn.Module, optimizer: torch.optim.Optimizer, trajectory: dict, gamma: float,
               lam: float, generator: torch.Generator, epochs: int = 4, samples: int = 32_768,
               batch_size: int = 1024) -> float:
    """Regress the critic on the lambda-returns of one generation's dreams (`dream.dream_return`'s TRAJECTORY), each
    bootstrapped by the critic itself where the dream was cut; SAMPLES of the steps the dreams ran, drawn with
    GENERATOR. Returns the last epoch's mean squared error."""
    obs, reward, terminated, alive = (trajectory[name] for name in ("obs", "reward", "terminated", "alive"))
    steps, envs = reward.shape
    with torch.no_grad():
        critic.obs_norm.update(obs[:-1][alive])
        values = critic(obs.flatten(0, 1)).view(steps + 1, envs)
        # a dream that terminated stops its return there (gae's done); steps after it are not trained on
        _, target = gae(reward, values[:-1], terminated, values[-1], gamma, lam)
    inputs, target = obs[:-1][alive], target[alive]
    chosen = torch.randperm(len(target), generator=generator)[:samples].to(target.device)
    inputs, target = inputs[chosen], target[chosen]
    for _ in range(epochs):
        losses = []
        for first in range(0, len(target), batch_size):
            loss = (critic(inputs[first:first + batch_size]) - target[first:first + batch_size]).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return float(np.mean(losses))


class RewardScaler:
    """Divide rewards by the running std of the discounted return (the usual PPO reward normalisation):
    CarRacing's +1000/N tile rewards and its -100 exit then reach the critic on a unit scale."""

    def __init__(self, num_envs: int, gamma: float):
        from actor_critic import RunningNorm

        self.gamma, self.returns, self.stats = gamma, torch.zeros(num_envs), RunningNorm(1)

    def __call__(self, reward: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
        self.returns = self.returns * self.gamma + reward
        self.stats.update(self.returns[:, None])
        self.returns = self.returns * ~done
        return reward / torch.sqrt(self.stats.var + 1e-8)

    def state_dict(self) -> dict:
        return self.stats.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stats.load_state_dict(state)


def ppo_update(model, optimizer, batch: dict, epochs: int, minibatches: int, clip_coef: float, ent_coef: float,
               vf_coef: float, max_grad_norm: float, target_kl: float = 0.0) -> dict:
    """The clipped PPO update on one rollout. batch: obs (B, D), sample (B, 3) (the distribution's own
    sample), log_prob, advantage, value_target (B,). Advantages are normalised per minibatch; with
    target_kl > 0 the epochs stop early once the policy moved that far. Returns the last epoch's means."""
    size = len(batch["obs"])
    minibatch = max(1, size // minibatches)
    for epoch in range(epochs):
        stats = {"policy_loss": [], "value_loss": [], "entropy": [], "approx_kl": [], "clip_fraction": []}
        permutation = torch.randperm(size)
        for start in range(0, size - minibatch + 1, minibatch):
            index = permutation[start:start + minibatch]
            dist = model.policy(batch["obs"][index])
            log_ratio = dist.log_prob(batch["sample"][index]) - batch["log_prob"][index]
            ratio = log_ratio.exp()
            advantage = batch["advantage"][index]
            advantage = (advantage - advantage.mean()) / (advantage.std(unbiased=False) + 1e-8)
            policy_loss = torch.max(-advantage * ratio,
                                    -advantage * ratio.clamp(1 - clip_coef, 1 + clip_coef)).mean()
            value_loss = 0.5 * (model.value(batch["obs"][index]) - batch["value_target"][index]).pow(2).mean()
            entropy = dist.entropy().mean()
            loss = policy_loss - ent_coef * entropy + vf_coef * value_loss
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            with torch.no_grad():
                stats["approx_kl"].append(float(((ratio - 1) - log_ratio).mean()))  # the low-variance estimator
                stats["clip_fraction"].append(float(((ratio - 1).abs() > clip_coef).float().mean()))
            stats["policy_loss"].append(policy_loss.item()), stats["value_loss"].append(value_loss.item())
            stats["entropy"].append(entropy.item())
        if target_kl and np.mean(stats["approx_kl"]) > target_kl:
            break
    return {name: float(np.mean(values)) for name, values in stats.items()} | {"epochs": epoch + 1}


@dataclasses.dataclass
class ControllerStageArgs:
    """Flags every controller stage shares (train_ppo.py, train_ppo_in_dream.py, train_cmaes_in_dream.py)."""

    ckpt_dir: Path = Path("checkpoints")
    """reads vae.pt and world_model.pt, writes controller_<name>.pt and <name>_latest.pt"""
    log_dir: Path = Path("runs")
    """TensorBoard logs go to LOG_DIR/<stage>-<time>/"""
    max_steps: int = 1000
    """episode length"""
    eval_every: int = 20
    """play the current controller deterministically in the real env every this many updates or
    generations (0: never)"""
    eval_episodes: int = 4
    """real tracks per check (PPO: 0 plays none, the dream's checks still run)"""
    eval_seed: int = 5_000_000
    """real tracks for those checks (apart from the final evaluation's 1,000,000+)"""
    workers: int = 2
    """worker processes for the real envs (training envs and checks)"""
    ray_address: str | None = None
    """run the real checks (and CMA-ES's population) on this Ray cluster: auto, or the head's HOST:PORT"""
    seed: int = 0
    """seed of torch, numpy, the envs' tracks and the dreams"""
    device: str = "auto"
    """auto (CUDA when there is one), cpu, cuda or cuda:N"""
    threads: int = 0
    """torch CPU threads (0: torch's default)"""
    fresh: bool = False
    """ignore <name>_latest.pt and start over"""


@dataclasses.dataclass
class PPOArgs(ControllerStageArgs):
    """Flags of the PPO stages (train_ppo.py, train_ppo_in_dream.py)."""

    total_steps: int = 1_000_000
    """env steps over all envs (a resumed run trains up to this many)"""
    num_envs: int = 8
    rollout_steps: int = 128
    """steps per env between updates"""
    learning_rate: float = 3e-4
    """Adam learning rate"""
    anneal_lr: bool = True
    """decay the learning rate linearly to 0 over total_steps"""
    gamma: float = 0.99
    """discount per decision"""
    gae_lambda: float = 0.95
    """lambda of the GAE advantages and value targets"""
    update_epochs: int = 10
    """passes over each rollout"""
    minibatches: int = 8
    """minibatches per pass"""
    clip_coef: float = 0.2
    """PPO's ratio clip"""
    ent_coef: float = 0.0
    """entropy bonus weight"""
    vf_coef: float = 0.5
    """value loss weight"""
    max_grad_norm: float = 0.5
    """clip the gradient's norm to this"""
    target_kl: float = 0.0
    """stop an update's epochs once the approximate KL passes this (0: never)"""
    weight_average: float = 0.0
    """> 0: the controller saved is an exponential moving average of the weights over updates with this decay
    (torch.optim.swa_utils; 0.95 averages about the last 20 updates), training goes on with the raw weights"""
    hidden_dim: int = 256
    """width of the actor's and critic's hidden layers"""
    distribution: Literal["beta", "tanh_normal"] = "beta"
    """the actor's distribution over the bounded action"""
    precision: Precision = "fp32"
    """arithmetic of the update's networks (and of a dream's steps, train_ppo_in_dream.py): fp32, or bf16 mixed
    precision (weights, optimizer, distributions and losses stay fp32)"""


def train_ppo(args: PPOArgs, envs, name: str, device, extra_eval=None, warm_start: bool = False,
              keep_best: bool = False, init_from: Path | None = None, partner: dict | None = None) -> dict:
    """The PPO loop shared by train_ppo.py (real envs) and train_ppo_in_dream.py (dreams).

    `envs`: RealFeatureEnvs, DreamFeatureEnvs or ImaginedFeatureEnvs. With `warm_start`, a <name>_latest.pt
    trained in an earlier world model lends its weights (actor-critic, optimizer, reward scaler) and the
    updates count again from 0 in the current one (the on-policy rounds of the dream loop); a resumed run
    moves the envs past the tracks or dreams it already drew (`envs.skip`). Writes CKPT_DIR/controller_<name>.pt
    (the actor-critic, with the identities of the VAE and world model) and <name>_latest.pt (plus optimizer
    and reward scaler: re-running resumes) after every update, TensorBoard scalars under LOG_DIR/<name>-<time>/
    (`<kind>/episode_return` for the training episodes, `eval/real_return` every EVAL_EVERY updates, and
    whatever `extra_eval(model)` returns then). Returns the last metrics. The envs are closed when it
    returns or raises. With `keep_best` (real-env PPO only: a dream-trained controller is never picked by a real
    return), CONTROLLER_<name>.pt ends as the controller whose real check scored best (the earliest of equals),
    not the last one; the last stays in <name>_latest.pt, which also carries the best so far across a resume.
    `init_from`: a controller_*.pt (same settings, on CKPT_DIR's VAE and world model) whose weights a new run
    starts from, with a fresh optimizer and reward scaler (a resume ignores it). `partner`: the identities of the
    frozen controller and world model whose actions the envs mix with this one's (RealFeatureEnvs' partner),
    recorded in the checkpoints; a run resumes only beside the same partner.
    """
    if keep_best and not (args.eval_every and args.eval_episodes):
        raise UserError("keeping the best-checked controller needs real checks: --eval-every and --eval-episodes > 0")
    try:  # the envs' worker processes end with the loop, whatever way it ends
        return _ppo_loop(args, envs, name, device, extra_eval, warm_start, keep_best, init_from, partner)
    finally:
        envs.close()


def _ppo_loop(args: PPOArgs, envs, name: str, device, extra_eval, warm_start: bool, keep_best: bool,
              init_from: Path | None, partner: dict | None) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    from actor_critic import ActorCritic, ControllerConfig, to_env_action

    batch_size = args.num_envs * args.rollout_steps  # decisions per update
    frames_per_update = batch_size * envs.action_repeat  # env steps (frames), what TOTAL_STEPS counts
    updates = args.total_steps // frames_per_update
    if not 0 <= args.weight_average < 1:
        raise UserError(f"--weight-average is a decay in [0, 1) (0: off), not {args.weight_average}")
    if updates < 1 or args.minibatches < 1 or args.update_epochs < 1:
        raise UserError(f"--total-steps ({args.total_steps}) must hold at least one rollout of --num-envs x "
                        f"--rollout-steps x action repeat ({frames_per_update}); --minibatches and --update-epochs "
                        "at least 1")
    identities = {"vae": checkpoint_identity(args.ckpt_dir / "vae.pt"),
                  "world_model": checkpoint_identity(args.ckpt_dir / "world_model.pt")}
    if partner is not None:
        identities["partner"] = partner
    config = ControllerConfig(kind="actor_critic", obs_dim=envs.obs_dim, hidden_dim=args.hidden_dim,
                              distribution=args.distribution, action_repeat=envs.action_repeat)
    model = ActorCritic(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.learning_rate, eps=1e-5)
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.weight_average),
                             use_buffers=True) if args.weight_average else None
    scaler = RewardScaler(args.num_envs, args.gamma)
    latest_path, out_path = args.ckpt_dir / f"{name}_latest.pt", args.ckpt_dir / f"controller_{name}.pt"

    start_update, log_dir = 0, args.log_dir / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    checkpoint = resume_controller_checkpoint(latest_path, out_path, args.fresh, identities["world_model"]["sha256"],
                                              config, CONTROLLER_SCRIPTS[name], device, warm_start)
    # keep_best: {"real_return", "update", "controller": the controller checkpoint of that update}
    best = checkpoint.get("best_check") if checkpoint and not checkpoint.get("warm_start") else None
    if checkpoint and not checkpoint.get("warm_start") and _hashes(checkpoint.get("partner")) != _hashes(partner):
        def named(identities: dict | None) -> str:
            return identities["controller"]["path"] if identities else "no partner"

        raise UserError(f"{latest_path} was trained beside {named(checkpoint.get('partner'))}, not "
                        f"{named(partner)}: the same --partner, or --fresh")
    if checkpoint:
        model.load_state_dict(checkpoint.get("trained_state_dict", checkpoint["state_dict"]))  # (raw, if averaged)
        if averaged is not None and "averaged_model" in checkpoint and not checkpoint.get("warm_start"):
            averaged.load_state_dict(checkpoint["averaged_model"])  # (a new world model starts a new average)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["reward_scaler"])
        log_dir = Path(checkpoint["log_dir"])
        if not checkpoint.get("warm_start"):
            start_update = checkpoint["update"]
            print(f"resuming from {latest_path}: update {start_update} of {updates}, "
                  f"{checkpoint['env_steps']} env steps")
    elif init_from is not None:
        # (agent.load_controller checks that it saw the road through CKPT_DIR's VAE and world model; a play-only
        # copy, make_ensemble.py's, comes with a new critic)
        initial, initial_config = load_controller(init_from, args.ckpt_dir, args.ckpt_dir / "world_model.pt", device,
                                                  "its training stage on these files")
        if initial_config != config:
            raise UserError(f"--init-from {init_from} was trained with {plain(initial_config)}, not {plain(config)}")
        model.load_state_dict(initial.state_dict())
        print(f"starting from the weights of {init_from}")
    envs.skip(start_update * args.rollout_steps)  # a resumed run draws new tracks or dreams, not the ones it had
    if start_update >= updates:
        print(f"{latest_path} has already trained {start_update} updates; nothing to do")
        if keep_best:
            _ship_best(best, out_path)
        return checkpoint["metrics"]

    print(f"PPO ({args.distribution} actor) on {envs.num_envs} {envs.kind} envs: {updates} updates of "
          f"{batch_size} decisions x {envs.action_repeat} frames ({updates * frames_per_update:,} env steps) "
          f"on {device}; logs in {log_dir}")
    writer = SummaryWriter(log_dir)
    writer.add_text("args", str(plain(args)))
    shape = (args.rollout_steps, args.num_envs)
    buffer = {"obs": torch.zeros(*shape, envs.obs_dim, device=device), "sample": torch.zeros(*shape, 3, device=device),
              **{key: torch.zeros(shape, device=device) for key in ("log_prob", "value", "reward", "done")}}
    episode_returns, finished, recent = torch.zeros(args.num_envs), [], []  # finished: this update's
    metrics: dict = {}
    obs = envs.reset().to(device)
    bar = tqdm(total=updates * frames_per_update, initial=start_update * frames_per_update, unit="step", desc=name,
               dynamic_ncols=True)
    try:
        # updates before this run's first: in earlier world models (a warm start) and in this one (a resume)
        total_updates = checkpoint.get("total_updates", checkpoint["update"]) - start_update if checkpoint else 0
        for update in range(start_update, updates):
            if args.anneal_lr:
                optimizer.param_groups[0]["lr"] = args.learning_rate * (1 - update / updates)
            rollout_start = time.perf_counter()
            for t in range(args.rollout_steps):
                with torch.no_grad():
                    dist = model.policy(obs)
                    sample = dist.sample()
                    buffer["log_prob"][t], buffer["value"][t] = dist.log_prob(sample), model.value(obs)
                buffer["obs"][t], buffer["sample"][t] = obs, sample
                obs, reward, terminated, truncated, final_obs = envs.step(to_env_action(dist.unit_action(sample)))
                obs, reward, final_obs = obs.to(device), reward.cpu(), final_obs.to(device)
                done = (terminated | truncated).cpu()
                episode_returns += reward
                finished += episode_returns[done].tolist()
                episode_returns[done] = 0
                scaled = scaler(reward, done).to(device)
                if truncated.any():  # the episode was cut, not over: bootstrap from its last observation
                    with torch.no_grad():
                        scaled += args.gamma * model.value(final_obs) * truncated.to(device).float()
                buffer["reward"][t], buffer["done"][t] = scaled, done.to(device).float()
            with torch.no_grad():
                advantage, value_target = gae(buffer["reward"], buffer["value"], buffer["done"], model.value(obs),
                                              args.gamma, args.gae_lambda)
            rollout_seconds = time.perf_counter() - rollout_start
            batch = {key: buffer[key].flatten(0, 1) for key in ("obs", "sample", "log_prob")}
            batch |= {"advantage": advantage.flatten(), "value_target": value_target.flatten()}
            with autocast(device, args.precision):
                metrics = ppo_update(model, optimizer, batch, args.update_epochs, args.minibatches, args.clip_coef,
                                     args.ent_coef, args.vf_coef, args.max_grad_norm, args.target_kl)
            model.obs_norm.update(batch["obs"])  # between updates: see RunningNorm
            if averaged is not None:
                averaged.update_parameters(model)
            shipped = model if averaged is None else averaged.module
            if not all(math.isfinite(value) for value in metrics.values()):
                raise UserError(f"PPO diverged at update {update + 1} ({metrics}); the last good checkpoint is "
                                f"{latest_path}")
            env_steps = (update + 1) * frames_per_update
            metrics |= {"steps_per_second": frames_per_update / rollout_seconds,
                        "explained_variance": float(1 - (value_target - buffer["value"]).var() / value_target.var())}
            for value in finished:
                writer.add_scalar(f"{envs.kind}/episode_return", value, env_steps)
            recent = (recent + finished)[-20:]
            finished = []
            if recent:
                metrics[f"{envs.kind}_episode_return"] = float(np.mean(recent))  # the last 20 episodes
            for key, value in metrics.items():
                writer.add_scalar(f"ppo/{key}", value, env_steps)
            writer.add_scalar("ppo/learning_rate", optimizer.param_groups[0]["lr"], env_steps)
            checkpoint = stage_checkpoint(config, shipped, args, log_dir, update=update + 1, env_steps=env_steps,
                                          total_updates=total_updates + update + 1, metrics=metrics, **identities)
            resume_state = {"optimizer": optimizer.state_dict(), "reward_scaler": scaler.state_dict()}
            if averaged is not None:
                resume_state |= {"trained_state_dict": model.state_dict(), "averaged_model": averaged.state_dict()}
            if keep_best:
                resume_state["best_check"] = best
            save_stage(out_path, latest_path, checkpoint, resume_state)
            if args.eval_every and ((update + 1) % args.eval_every == 0 or update + 1 == updates):
                with torch.random.fork_rng():  # a check (it builds models to play) must not move training's draws
                    line = f"update {update + 1}:"
                    if args.eval_episodes:  # (0: no real check here, e.g. a member of an ensemble the caller checks)
                        real = evaluate_agent(args.ckpt_dir, name, args.eval_episodes, args.eval_seed, args.workers,
                                              args.max_steps, progress=False, ray_address=args.ray_address)
                        writer.add_scalar("eval/real_return", real["mean"], env_steps)
                        line += f" real env {real['mean']:.1f} ± {real['std']:.1f} over {args.eval_episodes} tracks,"
                        metrics["real_return"] = real["mean"]
                        if keep_best and (best is None or real["mean"] > best["real_return"]):
                            # a copy: the checkpoint's state_dict holds the live weights, which train on
                            best = {"real_return": real["mean"], "update": update + 1,
                                    "controller": copy.deepcopy(checkpoint)}
                            line += " the best so far,"
                            resume_state["best_check"] = best
                    for key, value in (extra_eval(shipped) if extra_eval else {}).items():
                        writer.add_scalar(f"eval/{key}", value, env_steps)
                        line += f" {key.replace('_', ' ')} {value:.1f},"
                        metrics[key] = value
                bar.write(line.rstrip(","))
                # the checks' figures too, so a re-run that finds nothing to do returns them
                save_stage(out_path, latest_path, checkpoint | {"metrics": metrics}, resume_state, write_out=False)
            bar.update(frames_per_update)
            bar.set_postfix(ret=f"{metrics.get(f'{envs.kind}_episode_return', float('nan')):.1f}",
                            sps=f"{metrics['steps_per_second']:.0f}", kl=f"{metrics['approx_kl']:.3f}", refresh=False)
    finally:
        bar.close()
        writer.close()
    if keep_best:
        _ship_best(best, out_path)
    print(f"controller in {out_path}")
    return metrics


def _hashes(identities: dict | None) -> dict | None:
    """{part: sha256} of a checkpoint's identities (the same files wherever they lie)."""
    return {part: identity["sha256"] for part, identity in identities.items()} if identities else None


def _ship_best(best: dict | None, out_path: Path) -> None:
    """Write the best-checked controller as the stage's output (again on a re-run: the same file)."""
    if best is None:  # (a kill before the first check was saved: the last controller stays)
        print(f"no real check was recorded: {out_path} is the last controller")
        return
    save_checkpoint(out_path, best["controller"])
    print(f"kept the controller of update {best['update']}, whose real check scored {best['real_return']:.1f}")
