"""Train the world model M (GRU or MDN-RNN) on VAE latents of the collected episodes.

Reads:  CKPT_DIR/vae.pt, DATA_DIR/rollouts/*/ep_*.npz (collects random episodes first if none).
Writes: DATA_DIR/latents/<VAE hash>/... (each episode encoded once per VAE: mu, logvar; reused
        while the VAE is unchanged, rebuilt when it changes, resumed when killed),
        CKPT_DIR/world_model.pt (best validation loss; carries the VAE's identity and a bank of real
        start latents, so the checkpoint dir alone is enough to dream), CKPT_DIR/world_model_latest.pt
        (every epoch, with the optimizer: re-running resumes), CKPT_DIR/world_model_grid.png (real |
        VAE reconstruction | open-loop dream), TensorBoard logs under LOG_DIR/world_model-<time>/.

One step of the model is one decision: episodes collected at ACTION_REPEAT k (each action held for k
frames, one frame kept per decision) train a model that steps every k frames, and every controller
trained on it decides at that rate, in the dream, in training and in play (the one clock). Episodes
collected at another rate are skipped with one line.

Training draws z from N(mu, sigma) per batch (or takes mu, --latent mean) and trains on windows of SEQ_LEN
steps (whole episodes at the default) with a train/validation split by episode and gradient clipping.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import imageio.v3 as iio
import numpy as np
import torch
from tqdm import tqdm

from agent import load_vae
from dream import BatchedDream, critical_states
from episodes import encode_episodes, load_episode, load_latent_episode, split_episodes
from rollouts import find_or_collect_episodes
from utils import (
    Precision,
    StageArgs,
    UserError,
    atomic_write,
    autocast,
    checkpoint_identity,
    frames_grid,
    load_checkpoint,
    plain,
    resume_checkpoint,
    run_main,
    save_stage,
    setup_stage,
    stage_checkpoint,
)
from world_model import RecurrentWorldModel, WorldModelConfig, build_world_model


@dataclass
class Args(StageArgs):
    arch: Literal["gru", "mdn"] = "mdn"
    """gru: GRU + a Gaussian over next z; mdn: LSTM + a mixture of Gaussians (the original MDN-RNN)"""
    epochs: int = 40
    """total epochs (one pass over the training episodes each); a resumed run trains up to this many"""
    batch_size: int = 16
    """sequences per batch"""
    seq_len: int = 250
    """window length in decisions; windows start at random offsets in episodes longer than this"""
    action_repeat: int = 4
    """frames per decision: train on the episodes collected at this rate (collect_data.py --action-repeat)"""
    lr: float = 1e-3
    """Adam learning rate"""
    hidden_dim: int = 256
    """size of h, the recurrent state the controller sees"""
    num_mixtures: int = 5
    """Gaussians per z dimension (mdn only)"""
    reward_overshoot_weight: float = 1.0
    """> 1 punishes predicting more reward than was received more than predicting less"""
    reward_overshoot_where: Literal["all", "no-tile"] = "all"
    """where that weight applies: every decision, or only those that earned no new tile (the dream is then
    pessimistic where the road may be lost, yet pays a fast decision's second tile in full)"""
    reward_huber_delta: float = 1.0
    """the reward loss is squared within this of the target, linear beyond (1: about the median; 4: about the
    mean over a decision's tile counts, still robust to -100 for leaving the playfield)"""
    done_pos_weight: float = 10.0
    """weight of the rare done=1 steps in the done loss"""
    grad_clip: float = 1.0
    """clip the gradient's norm to this"""
    val_percent: float = 5.0
    """percent of episodes held out for validation (chosen by file name, stable as data grows)"""
    start_bank_size: int = 64
    """real episode-start latents stored in the checkpoint for dreams to start from"""
    critical_weight: float = 1.0
    """weight in the training loss of the decisions around each loss of the road (dream.critical_states: the 20
    before it and the 10 from it) against 1 for the others: the rare moments a dream must not smooth over"""
    temperature: float = 1.0
    """sampling temperature of the dream in the grid picture"""
    latent: Literal["sample", "mean"] = "sample"
    """z the model learns from: sample (drawn from the VAE's N(mu, sigma) per batch, the original) or mean (the
    VAE's mu, the z the agent sees in the real env: its dream then steps as real latents do, without the
    posterior noise of the VAE's unused dimensions)"""
    workers: int = 1
    """collection worker processes (train_world_model_parallel.py uses every core)"""
    precision: Precision = "fp32"
    """training arithmetic of the recurrent cell and heads: fp32, or bf16 mixed precision (weights, optimizer and
    losses stay fp32; validation runs in fp32)"""


def load_latents(cache: dict[Path, Path], vae_sha256: str) -> dict[Path, dict]:
    """{episode file: its cached latents and labels}, for every readable cache file."""
    episodes = {}
    for episode_path, cache_path in cache.items():
        episode = load_latent_episode(cache_path, vae_sha256)
        if episode is not None:
            episodes[episode_path] = {key: episode[key] for key in ("mu", "logvar", "action", "reward", "terminated",
                                                                    "action_repeat")}
    return episodes


def make_batch(episodes: list[dict], seq_len: int, rng: np.random.Generator, device) -> dict[str, torch.Tensor]:
    """Windows of up to seq_len steps (random offsets), padded to the longest, with masks.

    Step t feeds (z_t, a_t) and is scored on z_{t+1}, reward_t and terminated_t; `z_mask` drops the
    last step of an episode (no next frame) and `step_mask` the padding. An episode with a `weight` per step
    (T,) weighs its steps so in both masks (the losses are weighted means).
    """
    length = min(seq_len, max(len(ep["reward"]) for ep in episodes))
    keys = ("mu", "logvar", "action")
    batch = {key: np.zeros((len(episodes), length + 1, episodes[0][key].shape[1]), np.float32) for key in keys}
    for key in ("reward", "terminated", "step_mask", "z_mask"):
        batch[key] = np.zeros((len(episodes), length), np.float32)
    for row, ep in enumerate(episodes):
        steps = len(ep["reward"])
        start = int(rng.integers(0, steps - seq_len + 1)) if steps > seq_len else 0
        take = min(length, steps - start)
        for key in keys:
            batch[key][row, :take] = ep[key][start:start + take]
            if start + take < steps:  # the window ends before the episode: its next latent is known
                batch[key][row, take] = ep[key][start + take]
        batch["reward"][row, :take] = ep["reward"][start:start + take]
        batch["terminated"][row, :take] = ep["terminated"][start:start + take]
        weight = ep["weight"][start:start + take] if "weight" in ep else 1  # (only training episodes have one)
        batch["step_mask"][row, :take] = weight
        batch["z_mask"][row, :take] = weight
        if start + take == steps:
            batch["z_mask"][row, take - 1] = 0
    return {key: torch.from_numpy(value).to(device) for key, value in batch.items()}


def model_loss(model: RecurrentWorldModel, batch: dict, args: Args, sample: bool = True):
    """Predictions and losses on a batch; z drawn from N(mu, sigma) if `sample` and the model learns from samples,
    else mu."""
    sample = sample and model.config.latent == "sample"
    z = batch["mu"] + torch.exp(0.5 * batch["logvar"]) * torch.randn_like(batch["mu"]) if sample else batch["mu"]
    pred, _ = model(z[:, :-1], batch["action"][:, :-1])
    losses = model.loss(pred, z[:, 1:], batch["reward"], batch["terminated"], batch["step_mask"], batch["z_mask"],
                        args.reward_overshoot_weight, args.done_pos_weight, args.reward_overshoot_where,
                        args.reward_huber_delta)
    return pred, losses


@torch.no_grad()
def validate(model: RecurrentWorldModel, episodes: list[dict], args: Args, device) -> dict[str, float]:
    """Per-head figures on whole validation episodes, deterministic (z = mu)."""
    model.eval()
    totals = {"z_nll": 0.0, "z_mse": 0.0, "reward_mae": 0.0, "reward_overshoot": 0.0, "no_tile_overshoot": 0.0,
              "loss": 0.0}
    true_pos = pred_pos = actual_pos = z_steps = steps = no_tile_steps = 0
    for start in range(0, len(episodes), args.batch_size):
        batch = make_batch(episodes[start:start + args.batch_size], 10**9, np.random.default_rng(0), device)
        pred, losses = model_loss(model, batch, args, sample=False)
        step_mask, z_mask = batch["step_mask"], batch["z_mask"]
        n_steps, n_z = step_mask.sum().item(), z_mask.sum().item()
        totals["loss"] += losses["loss"].item() * n_steps
        totals["z_nll"] += losses["z_nll"].item() * n_z
        z_error = (model.mixture_mean(pred) - batch["mu"][:, 1:]).pow(2).mean(-1)
        totals["z_mse"] += (z_error * z_mask).sum().item()
        totals["reward_mae"] += ((pred.reward - batch["reward"]).abs() * step_mask).sum().item()
        overshoot = (pred.reward - batch["reward"]).clamp(min=0) * step_mask
        no_tile = (batch["reward"] < 0) * step_mask  # steps that earned no new tile: grass, visited road
        totals["reward_overshoot"] += overshoot.sum().item()
        totals["no_tile_overshoot"] += (overshoot * no_tile).sum().item()
        no_tile_steps += no_tile.sum().item()
        predicted, actual = (pred.done_logit > 0) & (step_mask > 0), batch["terminated"] > 0
        true_pos += (predicted & actual).sum().item()
        pred_pos += predicted.sum().item()
        actual_pos += actual.sum().item()
        z_steps, steps = z_steps + n_z, steps + n_steps
    model.train()
    return {"loss": totals["loss"] / steps, "z_nll": totals["z_nll"] / z_steps, "z_mse": totals["z_mse"] / z_steps,
            "reward_mae": totals["reward_mae"] / steps, "reward_overshoot": totals["reward_overshoot"] / steps,
            "no_tile_overshoot": totals["no_tile_overshoot"] / max(no_tile_steps, 1), "dones": actual_pos,
            "done_precision": true_pos / pred_pos if pred_pos else math.nan,
            "done_recall": true_pos / actual_pos if actual_pos else math.nan}


@torch.no_grad()
def dream_grid(vae, model: RecurrentWorldModel, episode_path: Path, start_bank: dict, temperature: float,
               device, columns: int = 12, every: int = 10, start: int = 60) -> np.ndarray:
    """Rows: real frames | VAE reconstructions | the world model's open-loop dream fed the same actions.

    The dream starts from the real latent at `start` (after the opening zoom), warmed up on the real
    latents before it, then runs on its own samples.
    """
    episode = load_episode(episode_path)
    start = min(start, max(0, len(episode["obs"]) - columns * every - 1))
    steps = min(columns * every, len(episode["obs"]) - start - 1)
    if steps < 1:
        return None
    frames = torch.from_numpy(episode["obs"][:start + steps + 1]).to(device)
    mu, _ = vae.encode(vae.to_input(frames))
    actions = torch.from_numpy(episode["action"]).to(device)
    dream = BatchedDream(model, start_bank["mu"], start_bank["logvar"], 1, temperature, 10**9, device)
    dream.reset([0])
    for t in range(start):  # warm h up on the real latents
        _, dream.state = model.step(mu[t:t + 1], actions[t:t + 1], dream.state)
    dream.z = mu[start:start + 1]
    dreamed = []
    for t in range(start, start + steps):
        dream.step(actions[t:t + 1])
        dreamed.append(dream.z)
    picks = list(range(every - 1, steps, every)) or [steps - 1]  # a short episode still shows its last step
    real = episode["obs"][[start + 1 + i for i in picks]]
    recon = vae.decode_frames(mu[[start + 1 + i for i in picks]])
    dreamt = vae.decode_frames(torch.cat([dreamed[i] for i in picks]))
    return frames_grid([real, recon, dreamt], scale=2)


def main(args: Args) -> None:
    device = setup_stage(args)
    if (args.epochs < 1 or args.batch_size < 1 or args.seq_len < 2 or not args.critical_weight > 0
            or not args.reward_huber_delta > 0):
        raise UserError("--epochs and --batch-size must be at least 1, --seq-len at least 2, --critical-weight and "
                        "--reward-huber-delta positive")
    vae_path = args.ckpt_dir / "vae.pt"
    vae, _ = load_vae(vae_path, device)
    vae_id = checkpoint_identity(vae_path)
    if args.action_repeat < 1:
        raise UserError("--action-repeat must be at least 1")
    config = WorldModelConfig(arch=args.arch, latent_dim=vae.config.latent_dim, hidden_dim=args.hidden_dim,
                              num_mixtures=args.num_mixtures, action_repeat=args.action_repeat, latent=args.latent)
    model = build_world_model(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    latest_path, best_path = args.ckpt_dir / "world_model_latest.pt", args.ckpt_dir / "world_model.pt"

    resumed = resume_checkpoint(latest_path, best_path, args, config, model, optimizer, device, "train_world_model.py")
    if resumed and resumed["vae"]["sha256"] != vae_id["sha256"]:
        raise UserError(f"{latest_path} was trained on another VAE than {vae_path}: re-run with --fresh")
    start_epoch, best_val, log_dir = ((resumed["epoch"], resumed["best_val_loss"], Path(resumed["log_dir"])) if resumed
                                      else (0, math.inf, args.log_dir / time.strftime("world_model-%Y%m%d-%H%M%S")))
    if start_epoch >= args.epochs:
        print(f"{latest_path} has already trained {start_epoch} epochs (--epochs {args.epochs}); nothing to do")
        return

    print(f"VAE {vae_path} (sha256 {vae_id['sha256'][:16]})")
    episode_paths = find_or_collect_episodes(args.data_dir, args.collect, args.collect_episodes,
                                             args.collect_max_steps, args.workers, args.env_backend, args.action_repeat)
    cache = encode_episodes(vae, vae_id["sha256"], episode_paths, args.data_dir, device)
    latents = load_latents(cache, vae_id["sha256"])
    if not latents:
        raise UserError(f"no readable episode in {args.data_dir}/rollouts/")
    other_clock = [path for path, ep in latents.items() if int(ep["action_repeat"]) != args.action_repeat]
    if other_clock:
        print(f"skipping {len(other_clock)} episodes collected at another action repeat than {args.action_repeat} "
              f"(e.g. {other_clock[0]})")
        latents = {path: ep for path, ep in latents.items() if path not in other_clock}
    if not latents:
        raise UserError(f"no episode in {args.data_dir}/rollouts/ was collected at action repeat {args.action_repeat}: "
                        f"run collect_data.py --action-repeat {args.action_repeat}")
    train_paths, val_paths = split_episodes(sorted(latents), args.val_percent)
    data_id = hashlib.sha256("\n".join(str(p) for p in sorted(latents)).encode()).hexdigest()[:16]
    if resumed and resumed.get("data_id") != data_id:  # new episodes: old validation losses are not comparable
        print(f"the data set changed since {latest_path} ({len(latents)} episodes now): best val loss reset")
        best_val = math.inf
    train_eps, val_eps = [latents[p] for p in train_paths], [latents[p] for p in val_paths]
    if args.critical_weight != 1:
        for ep in train_eps:
            ep["weight"] = np.where(critical_states(ep["reward"]), args.critical_weight, 1.0).astype(np.float32)
        share = np.mean(np.concatenate([ep["weight"] != 1 for ep in train_eps]))
        print(f"{share:.1%} of the training decisions are around a loss of the road, "
              f"weighted x{args.critical_weight:g}")
    bank_eps = train_eps[:: max(1, len(train_eps) // args.start_bank_size)][:args.start_bank_size]
    start_bank = {"mu": torch.from_numpy(np.stack([ep["mu"][0] for ep in bank_eps])),
                  "logvar": torch.from_numpy(np.stack([ep["logvar"][0] for ep in bank_eps]))}
    train_steps = sum(len(ep["reward"]) for ep in train_eps)
    print(f"data: {len(train_eps)} train episodes ({train_steps} steps), {len(val_eps)} validation episodes; "
          f"{config.arch} model, {sum(p.numel() for p in model.parameters()):,} parameters on {device}; "
          f"logs in {log_dir}")

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir)
    writer.add_text("args", str(plain(args)))
    rng = np.random.default_rng(args.seed + start_epoch)
    batches_per_epoch = math.ceil(len(train_eps) / args.batch_size)
    step = start_epoch * batches_per_epoch
    bar = tqdm(total=(args.epochs - start_epoch) * batches_per_epoch, desc=f"world model ({config.arch})",
               unit="batch", dynamic_ncols=True)
    for epoch in range(start_epoch, args.epochs):
        order = rng.permutation(len(train_eps))
        epoch_start, seq_steps, running = time.perf_counter(), 0, []
        for first in range(0, len(order), args.batch_size):
            batch = make_batch([train_eps[i] for i in order[first:first + args.batch_size]], args.seq_len, rng, device)
            with autocast(device, args.precision):
                _, losses = model_loss(model, batch, args)
            if not torch.isfinite(losses["loss"]):
                raise UserError(f"world model loss became {losses['loss'].item()} at epoch {epoch + 1}, step {step}; "
                                f"the last good checkpoint is {latest_path}")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            step += 1
            seq_steps += int((batch["step_mask"] > 0).sum().item())
            running.append(losses["loss"].item())
            steps_per_s = seq_steps / (time.perf_counter() - epoch_start)
            for name, value in losses.items():
                writer.add_scalar(f"train/{name}", value.item(), step)
            writer.add_scalar("perf/seq_steps_per_s", steps_per_s, step)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{np.mean(running[-10:]):.3f}", steps_s=f"{steps_per_s:.0f}",
                            refresh=False)
        val = validate(model, val_eps, args, device)
        for name, value in val.items():
            writer.add_scalar(f"val/{name}", value, epoch + 1)
        metrics = {"train_loss": float(np.mean(running)), "seq_steps_per_s": steps_per_s,
                   **{f"val_{name}": value for name, value in val.items()}}
        improved = val["loss"] < best_val
        best_val = min(best_val, val["loss"])
        checkpoint = stage_checkpoint(config, model, args, log_dir, epoch=epoch + 1, metrics=metrics,
                                      best_val_loss=best_val, vae=vae_id, start_bank=start_bank, data_id=data_id)
        save_stage(best_path, latest_path, checkpoint, {"optimizer": optimizer.state_dict()}, write_out=improved)
        bar.write(f"epoch {epoch + 1}: train {metrics['train_loss']:.3f}, val {val['loss']:.3f} (z nll "
                  f"{val['z_nll']:.3f}, z mse {val['z_mse']:.4f}, reward mae {val['reward_mae']:.3f} "
                  f"(overshoot {val['reward_overshoot']:.3f}, on no-tile steps {val['no_tile_overshoot']:.3f}), done "
                  f"precision {val['done_precision']:.2f} recall {val['done_recall']:.2f} of {val['dones']}), "
                  f"{steps_per_s:.0f} steps/s{'; saved' if improved else ''}")
    bar.close()
    writer.close()

    model.load_state_dict(load_checkpoint(best_path, map_location=device)["state_dict"])
    model.eval()
    grid = dream_grid(vae, model, val_paths[0], start_bank, args.temperature, device)
    if grid is not None:  # (a validation episode of one step has nothing to dream)
        atomic_write(args.ckpt_dir / "world_model_grid.png", lambda f: iio.imwrite(f, grid, extension=".png"))
    print(f"best val loss {best_val:.4f} in {best_path}; real | reconstruction | dream in "
          f"{args.ckpt_dir / 'world_model_grid.png'}")


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
