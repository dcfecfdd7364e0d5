"""Learning in the dream, one command: collect -> world model -> PPO in the dream -> collect with it -> ...

Reads:  nothing but what it writes itself (CKPT_DIR/vae.pt is trained on round 0's episodes when absent).
Writes: DATA_DIR/rollouts/random/ (round 0: Brownian episodes) and DATA_DIR/rollouts/round<r>/ (episodes the
        dream-trained controller drove, with exploration noise, on tracks of their own), CKPT_DIR/vae.pt,
        world_model.pt, controller_ppo_dream.pt (+ their *_latest.pt), CKPT_DIR/dream_loop.json (one record
        per finished round), CKPT_DIR/dream_loop.png (the dream-to-real gap curve) and CKPT_DIR/rounds/round<r>/
        (the world model and controller as they were at the end of round r: controllers of several rounds can
        act together, make_ensemble.py --members CKPT_DIR CKPT_DIR/rounds/round<r> ...); logs under LOG_DIR.
        With MEMBERS > 1 also CKPT_DIR/member<i>/ (member i's VAE copy, world model and controller, and its
        rounds in CKPT_DIR/rounds/round<r>/member<i>/) and CKPT_DIR/controller_ensemble.pt (the ensemble of all
        members, make_ensemble.py). With SNAPSHOTS > 1, controller_ensemble.pt holds the snapshot ensemble instead,
        naming the earlier rounds' files where the loop keeps them (CKPT_DIR/rounds/round<r>/), uncopied.

Round r (0 .. ROUNDS-1):
  1. collect: round 0 drives RANDOM_EPISODES random episodes; round r >= 1 lets the current controller drive
     EPISODES_PER_ROUND episodes of new tracks, DETERMINISTIC_SHARE of them as it is evaluated (its failures
     included) and the rest with NOISE on its actions (around its path);
  2. world model: trains on every episode so far, up to WM_EPOCHS + WM_EPOCHS_PER_ROUND * r epochs (with
     CALIBRATE, the decisions around real losses of the road weigh what makes the last calibration even);
  3. controller: UPDATES_PER_ROUND PPO updates in imagination started from the real states of every episode,
     those around a loss of the road drawn CRITICAL_WEIGHT times as often (train_ppo_in_dream.py), going on
     from the previous round's weights;
  4. check: the deterministic controller's return in whole dreams and on CHECK_EPISODES real tracks, and the
     dream's calibration (rounds >= 1: how often the road is lost soon after a decision on it, in the round's
     noise-free episodes and in the dream of the previous round that drove them; only CALIBRATE uses it, for the
     world model's loss: real data, never a real return);
  5. keep: the round's world model and controller are copied to CKPT_DIR/rounds/round<r>/.
With MEMBERS > 1, steps 2 and 3 run for every member (seed SEED + i, in its own world model's dream), the
ensemble of their controllers (the mean action) drives step 1 and plays the real check, and the dream return
is the members' mean. With SNAPSHOTS > 1 the agent of CKPT_DIR is, once the last round is done, the ensemble of
the last round's controller and those of SNAPSHOTS - 1 earlier rounds, fixed in advance (a snapshot ensemble).
The real env only supplies the world model's data: the check is printed and logged, never trained on or used to
choose; the controllers shipped are those of the last round (and of the fixed earlier ones). A kill at any
moment resumes: finished rounds are in dream_loop.json, and each stage of the current round resumes from its
own checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

import make_ensemble
import train_ppo_in_dream
import train_vae
import train_world_model
from agent import load_controller, load_vae, load_world_model
from dream import load_replay, road_loss_rates
from episodes import episode_dir, episode_path, is_complete_npz, list_episodes, load_episode
from rollouts import collect_episodes, evaluate_agent
from utils import Precision, UserError, atomic_write, run_main

LOOP_FILE, CURVE_FILE = "dream_loop.json", "dream_loop.png"
MAX_CRITICAL_WEIGHT = 16.0  # (weight 16 overshot the real rate in an offline test: 26.5% against 17.3%)
ROUND_SEED = 10_000_000  # round r drives tracks ROUND_SEED + 100_000 r + i: apart from every other seed range


@dataclass
class Args:
    data_dir: Path = Path("data")
    """episodes of every round go to DATA_DIR/rollouts/"""
    ckpt_dir: Path = Path("checkpoints")
    """the run's checkpoints and its record, dream_loop.json"""
    log_dir: Path = Path("runs")
    """TensorBoard logs of every stage"""
    rounds: int = 14
    """rounds of collect -> world model -> controller (a resumed run goes on up to this many; 14 keep the data
    under 1M real frames)"""
    random_episodes: int = 200
    """round 0: random episodes (track seeds 0 ..)"""
    episodes_per_round: int = 50
    """rounds >= 1: episodes the current controller drives"""
    noise: float = 0.1
    """std of the Gaussian noise on the controller's actions while it collects"""
    deterministic_share: float = 0.5
    """share of each round's episodes the controller drives without noise, as it is evaluated: its own
    failures (slowing to a stop, which noise hides) then reach the world model"""
    action_repeat: int = 4
    """frames per decision: the clock of the world model and the controller"""
    vae_epochs: int = 12
    """epochs of the VAE when CKPT_DIR has none (12 over 200 episodes of 250 decisions: as many images as make
    train's 3 epochs over 800)"""
    arch: Literal["gru", "mdn"] = "mdn"
    """world model: MDN-RNN (LSTM + mixture) or GRU"""
    wm_epochs: int = 30
    """world-model epochs of round 0"""
    wm_epochs_per_round: int = 8
    """more world-model epochs per round, over all the data"""
    wm_critical_weight: float = 4.0
    """weight of the decisions around a real loss of the road in the world model's loss (1: uniform); its
    --critical-weight (the dream must not smooth those moments over, and loses the road as often as the car
    does); with --calibrate, round 0's weight"""
    calibrate: bool = False
    """set that weight anew every round from the dream's calibration (step 4 of the round before): times
    sqrt(real rate / dream rate of losing the road), within [1, MAX_CRITICAL_WEIGHT], so that a dream that loses
    the road too rarely learns those moments harder, and one that loses it too often less"""
    latent: Literal["sample", "mean"] = "sample"
    """z the world model learns from: sample (drawn from the VAE's posterior, the original) or mean (the VAE's mu,
    the z the controller sees in the real env); train_world_model.py's flag"""
    reward_overshoot_weight: float = 4.0
    """> 1: the world model's reward loss punishes predicting more than was earned (a dream that is not
    optimistic off the road); train_world_model.py's flag"""
    reward_overshoot_where: Literal["all", "no-tile"] = "all"
    """where that weight applies: every decision, or only those that earned no new tile (pessimistic where the road
    may be lost, yet a fast decision's second tile is paid; in the loop that dream was exploited: README, runs N
    and N1); train_world_model.py's flag"""
    reward_huber_delta: float = 1.0
    """the reward loss is squared within this of the target, linear beyond (4: about the mean over tile counts);
    train_world_model.py's flag"""
    updates_per_round: int = 60
    """PPO updates in imagination per round"""
    num_envs: int = 1024
    """imagined dreams per update, each started from a replayed real state"""
    horizon: int = 16
    """imagined decisions per dream before the critic bootstraps"""
    temperature: float = 1.0
    """dream sampling temperature"""
    weight_average: float = 0.0
    """> 0: the controller is the moving average of PPO's weights with this decay (train_ppo_in_dream.py's flag)"""
    check_episodes: int = 10
    """real tracks of the per-round check (seeds from 5,000,000; logged, never used)"""
    max_steps: int = 1000
    """episode length in frames (collection, checks and whole dreams)"""
    workers: int = 2
    """worker processes for collection and checks"""
    seed: int = 0
    """seed of every stage, and of the rounds' tracks"""
    env_backend: str = "fast"
    """fast (pixel-exact CarRacing-v3) or gymnasium for collection and checks"""
    ray_address: str | None = None
    """play each round's episodes and checks on this Ray cluster (auto, or the head's HOST:PORT)"""
    device: str = "auto"
    """where the VAE, world model and controller train: auto (CUDA when there is one), cpu, cuda or cuda:N"""
    critical_weight: float = 4.0
    """weight of the replayed states around a real loss of the road when imagination starts are drawn (1: uniform;
    4 made the shipped run's disasters go); train_ppo_in_dream.py's flag"""
    members: int = 1
    """> 1: so many world models and dream-trained controllers (member i in CKPT_DIR/member<i>/, seed SEED + i) learn
    from the same episodes, and their ensemble (make_ensemble.py: the mean of their actions) drives, is checked
    and is the agent of CKPT_DIR"""
    snapshots: int = 1
    """> 1: the agent of CKPT_DIR is the ensemble of the last round's controller and SNAPSHOTS - 1 earlier rounds'
    ones, SNAPSHOT_SPACING rounds apart, each in its own world model (make_ensemble.py; 1: the last controller)"""
    snapshot_spacing: int = 2
    """rounds between the controllers of a snapshot ensemble"""
    precision: Precision = "fp32"
    """arithmetic of the networks as they train and dream (VAE, world model, PPO's update and the dreams' steps):
    fp32, or bf16 mixed precision (faster on a CPU with AVX-512 BF16; weights and losses stay fp32)"""


def collect_round(args: Args, round_index: int) -> list[float]:
    """Round 0: random episodes; later rounds: the current dream controller drives, without and with noise.
    Returns the mean return of each batch collected now ([random] or [no noise, noise]; nan for a batch that
    was all there already)."""
    if round_index == 0:
        source = "random"
        batches = [(range(args.random_episodes), "random", {"action_repeat": args.action_repeat})]
    else:  # the first DETERMINISTIC_SHARE of the round's tracks without noise, the rest with NOISE
        plain, noisy = round_tracks(args, round_index)
        source, agent = f"round{round_index}", {"ckpt_dir": str(args.ckpt_dir), "controller": agent_controller(args)}
        batches = [(plain, "agent", agent | {"noise": 0.0}), (noisy, "agent", agent | {"noise": args.noise})]
    returns = []
    for seeds, policy, kwargs in batches:
        if seeds and not all(is_complete_npz(episode_path(args.data_dir, source, seed)) for seed in seeds):
            # (an agent is only loaded when there is something to drive)
            summaries = collect_episodes(args.data_dir, seeds, args.max_steps, args.workers, args.env_backend, policy,
                                         kwargs, source, ray_address=args.ray_address)
            returns.append(float(np.mean([s["return"] for s in summaries])))
            how = f" (the controller, noise {kwargs['noise']})" if policy == "agent" else ""
            print(f"round {round_index}: collected {len(summaries)} episodes{how} into "
                  f"{episode_dir(args.data_dir, source)}, return {returns[-1]:.1f}")
        else:
            returns.append(math.nan)
    return returns


def round_tracks(args: Args, round_index: int) -> tuple[range, range]:
    """The track seeds round ROUND_INDEX >= 1 drives without noise and with NOISE."""
    first = ROUND_SEED + 100_000 * round_index + 1000 * args.seed
    plain = first + round(args.deterministic_share * args.episodes_per_round)
    return range(first, plain), range(plain, first + args.episodes_per_round)


def road_loss_check(args: Args, round_index: int) -> dict:
    """The dream's calibration where tracks are decided (dream.road_loss_rates): how often the road is lost within
    30 decisions of a decision on it, in round ROUND_INDEX's noise-free episodes and in the dream of the world model
    and controller that drove them (round ROUND_INDEX - 1's, kept in CKPT_DIR/rounds/, which had not seen them).
    Logged; only --calibrate uses it (world_model_weight); {} for round 0 and for several members (an ensemble
    drove)."""
    previous = round_dir(args, round_index - 1)
    if round_index == 0 or args.members > 1 or not (previous / "controller_ppo_dream.pt").exists():
        return {}
    paths = [episode_path(args.data_dir, f"round{round_index}", seed) for seed in round_tracks(args, round_index)[0]]
    if not paths:  # (a round without noise-free episodes)
        return {}
    vae_path = args.ckpt_dir / "vae.pt"
    episodes = load_replay(args.data_dir, load_vae(vae_path)[0], vae_path, args.action_repeat, paths=paths,
                           progress=False)  # (encoded once: the world model reuses the cache)
    world_model, _ = load_world_model(previous / "world_model.pt")
    controller, _ = load_controller(previous / "controller_ppo_dream.pt", args.ckpt_dir, previous / "world_model.pt")
    rates = road_loss_rates(world_model, controller, episodes, temperature=args.temperature, seed=args.seed)
    return {"road_loss_real": rates["real"], "road_loss_dream": rates["dream"]}


def agent_controller(args: Args) -> str:
    """The controller of CKPT_DIR that drives the rounds' episodes and checks."""
    return "ensemble" if args.members > 1 else "ppo_dream"


def member_dir(args: Args, index: int) -> Path:
    """Member 0 is CKPT_DIR itself; every other member has a dir of its own in it, with a copy of the VAE."""
    directory = args.ckpt_dir / f"member{index}" if index else args.ckpt_dir
    if index and not (directory / "vae.pt").exists():
        directory.mkdir(exist_ok=True)
        with open(args.ckpt_dir / "vae.pt", "rb") as f:
            atomic_write(directory / "vae.pt", lambda out: shutil.copyfileobj(f, out))
    return directory


def world_model_weight(args: Args, records: list[dict], calibration: dict) -> float:
    """The weight of the decisions around real losses of the road in this round's world-model loss: WM_CRITICAL_WEIGHT,
    or with CALIBRATE the last round's weight times sqrt(real / dream) of this round's calibration (the square root
    damps a swing: the calibration measures the last round's model on 25 episodes)."""
    if not args.calibrate:
        return args.wm_critical_weight
    weight = records[-1].get("wm_critical_weight", args.wm_critical_weight) if records else args.wm_critical_weight
    if not calibration or not all(map(math.isfinite, calibration.values())):
        return weight
    floor = 0.01  # (a dream that never loses the road raises the weight by at most 10x a round, before the clip)
    ratio = (calibration["road_loss_real"] + floor) / (calibration["road_loss_dream"] + floor)
    return float(np.clip(weight * math.sqrt(ratio), 1.0, MAX_CRITICAL_WEIGHT))


def train_member(args: Args, round_index: int, index: int, wm_weight: float) -> dict:
    """Round ROUND_INDEX's world model (its critical states weighted WM_WEIGHT) and dream-trained controller of
    member INDEX; the controller's last metrics (a lone member checks itself on the real tracks; an ensemble's
    members leave that to the ensemble)."""
    directory, seed = member_dir(args, index), args.seed + index
    train_world_model.main(train_world_model.Args(
        data_dir=args.data_dir, ckpt_dir=directory, log_dir=args.log_dir, arch=args.arch,
        epochs=args.wm_epochs + args.wm_epochs_per_round * round_index, action_repeat=args.action_repeat,
        reward_overshoot_weight=args.reward_overshoot_weight, reward_overshoot_where=args.reward_overshoot_where,
        reward_huber_delta=args.reward_huber_delta, latent=args.latent,
        critical_weight=wm_weight, seed=seed, collect=False, device=args.device, precision=args.precision))
    lone = args.members == 1
    return train_ppo_in_dream.main(train_ppo_in_dream.Args(
        ckpt_dir=directory, data_dir=args.data_dir, log_dir=args.log_dir, num_envs=args.num_envs,
        horizon=args.horizon, rollout_steps=args.horizon, temperature=args.temperature, seed=seed,
        weight_average=args.weight_average, critical_weight=args.critical_weight, ray_address=args.ray_address,
        device=args.device, total_steps=args.updates_per_round * args.num_envs * args.horizon * args.action_repeat,
        eval_every=args.updates_per_round, eval_episodes=args.check_episodes if lone else 0,
        eval_dreams_per_episode=4 if lone else 4 * args.check_episodes, workers=args.workers,
        max_steps=args.max_steps, precision=args.precision))


def round_dir(args: Args, round_index: int, index: int = 0) -> Path:
    """Where round ROUND_INDEX's world model and controller of member INDEX are kept."""
    return args.ckpt_dir / "rounds" / f"round{round_index}" / (f"member{index}" if index else "")


def keep_round(args: Args, round_index: int) -> None:
    """Copy every member's world model and controller as they are at the end of ROUND_INDEX (2.9 MB a member), so
    that controllers of several rounds can act together (make_ensemble.py: a snapshot ensemble of one run)."""
    for index in range(args.members):
        source, target = member_dir(args, index), round_dir(args, round_index, index)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("world_model.pt", "controller_ppo_dream.pt"):
            make_ensemble.copy_file(source / name, target / name)


def snapshot_rounds(args: Args) -> list[int]:
    """The earlier rounds whose controllers act with the last one (last first: [11, 9] for 14 rounds, 3 snapshots)."""
    return [args.rounds - 1 - k * args.snapshot_spacing for k in range(1, args.snapshots)]


def data_frames(data_dir: Path) -> int:
    """Real env frames in the episode files (decisions x their action repeat)."""
    episodes = (load_episode(path, ("reward", "action_repeat")) for path in list_episodes(data_dir))
    return sum(len(ep["reward"]) * int(ep["action_repeat"]) for ep in episodes if ep is not None)


RECORD_KEYS = ("round", "real_frames", "wall_seconds", "dream_return", "real_return")  # numbers, in every round
RECIPE = ("data_dir", "action_repeat", "arch", "random_episodes", "episodes_per_round", "seed",  # fixed per run
          "members")
RECIPE_BEFORE = {"members": "1"}  # what a record written before a setting existed ran with


def load_records(path: Path, args: Args) -> list[dict]:
    """The finished rounds of the run in CKPT_DIR ([] for a new one); a run made with another recipe, or a
    damaged record, is a UserError rather than a silent mix of two runs."""
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_bytes())
        records, saved_args = saved["rounds"], saved["args"]
        numbers = (int, float)
        if not (isinstance(saved_args, dict) and isinstance(records, list) and all(
                isinstance(record, dict) and all(isinstance(record.get(key), numbers) for key in RECORD_KEYS)
                for record in records)):
            raise TypeError("not a record of rounds")
    except (ValueError, KeyError, TypeError) as error:  # (UnicodeDecodeError is a ValueError)
        raise UserError(f"{path} is damaged ({type(error).__name__}): move it away to start the loop over")
    other = [name for name in RECIPE if saved_args.get(name, RECIPE_BEFORE.get(name)) != str(getattr(args, name))]
    if other:
        raise UserError(f"{path} is the record of a run with other {', '.join(other)} "
                        f"({', '.join(f'{name}={saved_args.get(name)}' for name in other)}): use the same settings "
                        "or another --ckpt-dir")
    return records


def plot_curve(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frames = [r["real_frames"] / 1000 for r in records]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(frames, [r["dream_return"] for r in records], "o-", label="dream (whole dreams, deterministic)")
    ax.plot(frames, [r["real_return"] for r in records], "s-", label="real env (check tracks, logged only)")
    for key, style, label in (("collect_return_deterministic", "v--", "real env, next round's data, no noise"),
                              ("collect_return_noisy", "^:", "real env, next round's data, noise")):
        # round r's data is driven by round r - 1's controller: plotted at that round
        points = [(frames[i - 1], r[key]) for i, r in enumerate(records) if i and math.isfinite(r.get(key, math.nan))]
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set_xlabel("real env frames of data (thousands)")
    ax.set_ylabel("return")
    ax.set_title("dream-trained controller: dream vs real, per round")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def main(args: Args) -> None:
    if min(args.rounds, args.random_episodes, args.episodes_per_round, args.action_repeat, args.updates_per_round,
           args.wm_epochs, args.check_episodes) < 1:
        raise UserError("--rounds, --random-episodes, --episodes-per-round, --action-repeat, --updates-per-round, "
                        "--wm-epochs and --check-episodes must be at least 1")
    if args.snapshots < 1 or args.snapshot_spacing < 1 or min(snapshot_rounds(args), default=0) < 0:
        raise UserError(f"--snapshots {args.snapshots} with --snapshot-spacing {args.snapshot_spacing} needs rounds "
                        f"that exist: at least 1 each, and (snapshots - 1) x spacing below --rounds {args.rounds}")
    if args.calibrate and args.members > 1:
        raise UserError("--calibrate measures one world model and its controller: not with --members")
    if args.snapshots > 1 and args.members > 1:
        raise UserError("--snapshots and --members both make CKPT_DIR's ensemble: use one of them")
    loop_path = args.ckpt_dir / LOOP_FILE
    records = load_records(loop_path, args)
    if records:
        print(f"resuming: {len(records)} rounds done in {loop_path}")
    wall = records[-1]["wall_seconds"] if records else 0.0
    for round_index in range(len(records), args.rounds):
        round_start = time.perf_counter()
        collect_returns = collect_round(args, round_index)
        calibration = road_loss_check(args, round_index)
        if not (args.ckpt_dir / "vae.pt").exists():
            train_vae.main(train_vae.Args(data_dir=args.data_dir, ckpt_dir=args.ckpt_dir, log_dir=args.log_dir,
                                          epochs=args.vae_epochs, seed=args.seed, collect=False, device=args.device,
                                          precision=args.precision))
        wm_weight = world_model_weight(args, records, calibration)
        metrics = [train_member(args, round_index, index, wm_weight) for index in range(args.members)]
        keep_round(args, round_index)
        dream = float(np.mean([m.get("dream_return", math.nan) for m in metrics]))  # each member in its own dream
        if args.members > 1:
            make_ensemble.main(make_ensemble.Args(members=[member_dir(args, i) for i in range(args.members)],
                                                  out_dir=args.ckpt_dir, controller=["ppo_dream"]))
            real = evaluate_agent(args.ckpt_dir, "ensemble", args.check_episodes, train_ppo_in_dream.Args.eval_seed,
                                  args.workers, args.max_steps, args.env_backend, progress=False,
                                  ray_address=args.ray_address)
            print(f"ensemble of {args.members}: real env {real['mean']:.1f} ± {real['std']:.1f} over "
                  f"{args.check_episodes} tracks; members' dream returns "
                  + ", ".join(f"{m.get('dream_return', math.nan):.1f}" for m in metrics))
            real_return = real["mean"]
        else:
            real_return = metrics[0].get("real_return", math.nan)
        wall += time.perf_counter() - round_start
        checked_frames = args.max_steps * args.check_episodes * (round_index + 1)  # real, though never trained on
        record = {"round": round_index, "real_frames": data_frames(args.data_dir) + checked_frames,
                  "episodes": len(list_episodes(args.data_dir)), "wall_seconds": round(wall, 1),
                  "dream_return": dream, "real_return": real_return,
                  "collect_return_deterministic": collect_returns[0] if round_index else math.nan,
                  "collect_return_noisy": collect_returns[-1] if round_index else math.nan,
                  "wm_critical_weight": wm_weight, **calibration}
        records.append(record)
        atomic_write(loop_path, lambda f: f.write(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                               "rounds": records}, indent=2).encode()))
        plot_curve(records, args.ckpt_dir / CURVE_FILE)
        print(f"== round {round_index}: {record['real_frames']:,} real frames so far, {wall / 60:.1f} min, "
              f"dream return {record['dream_return']:.1f}, real check {record['real_return']:.1f} "
              f"over {args.check_episodes} tracks" + (
                  f"; the road lost within 30 decisions: {calibration['road_loss_real']:.1%} of the round's "
                  f"states, {calibration['road_loss_dream']:.1%} in the dream" if calibration else "")
              + (f"; world model's critical weight {wm_weight:.2f}" if args.calibrate else ""))
    print(f"dream-trained controller in {args.ckpt_dir / 'controller_ppo_dream.pt'}; rounds in {loop_path}")
    if args.snapshots > 1:  # (again on a re-run: it is cheap, and the last round may have changed)
        make_ensemble.main(make_ensemble.Args(
            members=[args.ckpt_dir] + [round_dir(args, r) for r in snapshot_rounds(args)], out_dir=args.ckpt_dir,
            controller=["ppo_dream"]))


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
