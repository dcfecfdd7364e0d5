"""The dream: its noise streams, its clock, imagination from replayed real states, and the dream loop."""

import json
import math

import numpy as np
import pytest
import torch
from test_controllers import gas_pays_world_model

from agent import agent_dir_and_controller, agent_files_of, controller_path, load_agent
from conftest import make_checkpoint_dir, run_script, save_actor_critic, save_linear_controller
from dream import (
    EVAL_DREAM_SEED,
    BatchedDream,
    DreamFeatureEnvs,
    ImaginedFeatureEnvs,
    ReplayStarts,
    counter_uniform,
    road_loss_rates,
    run_seeds,
)
from episodes import episode_path, list_episodes, load_episode
from rollouts import collect_episodes, evaluate_agent
from train_cmaes_in_dream import generation_seeds
from utils import UserError, file_sha256, save_checkpoint
from world_model import WorldModelConfig, build_world_model

TINY = WorldModelConfig(arch="mdn", latent_dim=4, hidden_dim=16, num_mixtures=3)


def test_counter_noise_depends_on_both_halves_of_the_seed():
    base = torch.arange(5)
    steps = torch.zeros(5, dtype=torch.int64)
    streams = [counter_uniform(seeds, steps, 8)
               for seeds in (base, base + 2**32, base + 7 * 2**32, base + EVAL_DREAM_SEED)]
    for i in range(len(streams)):
        for j in range(i):
            assert not torch.isclose(streams[i], streams[j]).any(), \
                "seeds equal in their low 32 bits drew the same noise"


def test_runs_with_another_seed_dream_other_dreams():
    model = build_world_model(TINY).eval()
    bank = torch.randn(50, 4), torch.full((50, 4), -1.0)
    first_steps = []
    for seed in (0, 1):
        envs = DreamFeatureEnvs(BatchedDream(model, *bank, 8, max_steps=40), seed)
        envs.reset()
        first_steps.append(envs.step(torch.zeros(8, 3))[0])
    assert not torch.isclose(first_steps[0][:, :4], first_steps[1][:, :4]).any()
    # the CMA-ES generations: every --seed and every generation on new dreams, shared by the candidates
    assert not set(generation_seeds(0, 3, 4, 2).tolist()) & set(generation_seeds(1, 3, 4, 2).tolist())
    assert not set(generation_seeds(0, 3, 4, 2).tolist()) & set(generation_seeds(0, 4, 4, 2).tolist())
    assert generation_seeds(0, 3, 4, 2).view(4, 2).unique(dim=0).shape == (1, 2)
    assert run_seeds(5, 0, 3).min() >= 5 * 2**32


def random_latent_episodes(count=3, steps=(7, 12, 5), seed=0):
    rng = np.random.default_rng(seed)
    return [{"mu": rng.normal(size=(steps[i], 4)).astype(np.float32),
             "action": rng.uniform(0, 1, (steps[i], 3)).astype(np.float32)} for i in range(count)]


def test_replay_starts_are_the_states_the_agent_saw():
    torch.manual_seed(0)
    model = build_world_model(TINY).eval()
    episodes = random_latent_episodes()
    starts = ReplayStarts(model, episodes, batch=2)  # two groups, padded to their longest
    assert len(starts) == 7 + 12 + 5
    expected_z, expected_state = [], []
    for ep in episodes:  # one episode at a time, as agent.Agent steps its memory
        state = model.initial_state(1)
        for t in range(len(ep["mu"])):
            z = torch.as_tensor(ep["mu"][t:t + 1])
            expected_z.append(z), expected_state.append(state)
            with torch.no_grad():
                _, state = model.step(z, torch.as_tensor(ep["action"][t:t + 1]), state)
    order = lambda x: x[torch.argsort(x[:, 0])]  # noqa: E731 (the flat order groups by step, not by episode)
    torch.testing.assert_close(order(starts.z), order(torch.cat(expected_z)))
    expected = torch.cat(expected_state)
    for z, state in zip(starts.z, starts.state):
        match = (torch.cat(expected_z) == z).all(-1).nonzero()[0, 0]
        torch.testing.assert_close(state, expected[match], atol=1e-5, rtol=1e-5)


def test_road_loss_rates_count_losses_of_the_road_in_the_episodes_and_in_the_dream():
    from actor_critic import ControllerConfig, LinearController

    reward = np.full(100, 1.0, np.float32)
    reward[60:] = -0.4  # lost from decision 58 on (its 10 decisions earn 2 - 8 x 0.4 < 0)
    episode = {"mu": np.random.default_rng(0).normal(size=(100, 4)).astype(np.float32),
               "action": np.zeros((100, 3), np.float32), "reward": reward}
    model = build_world_model(TINY).eval()
    controller = LinearController(ControllerConfig(obs_dim=model.controller_input_dim))
    with torch.no_grad():  # a dream that pays (or charges) the same every decision and never ends
        model.head.weight[-2:] = 0
        model.head.bias[-1] = -10.0
        rates = {}
        for paid in (1.0, -1.0):
            model.head.bias[-2] = paid
            rates[paid] = road_loss_rates(model, controller, [episode])
    # on-road decisions with 39 real ones after them: 0-59; a loss begins within 30 decisions from 29 on
    assert rates[1.0]["states"] == 60 and rates[1.0]["real"] == pytest.approx(31 / 60)
    assert rates[1.0]["dream"] == 0.0 and rates[-1.0]["dream"] == 1.0
    short = dict(episode, reward=reward[:30], mu=episode["mu"][:30], action=episode["action"][:30])
    assert road_loss_rates(model, controller, [short])["states"] == 0  # no decision has 39 real ones after it


def test_imagination_restarts_from_replayed_states_after_the_horizon():
    model = build_world_model(TINY).eval()
    starts = ReplayStarts(model, random_latent_episodes())
    envs = ImaginedFeatureEnvs(BatchedDream(model, starts.z[:2], torch.zeros(2, 4), 6, max_steps=1000), starts,
                               horizon=3, seed=0)
    real_z = {tuple(z.tolist()) for z in starts.z}
    obs = envs.reset()
    assert all(tuple(z.tolist()) in real_z for z in obs[:, :4]), "every dream starts at a real decision"
    for step in range(3):
        obs, reward, terminated, truncated, final_obs = envs.step(torch.rand(6, 3))
        done = terminated | truncated
        if step < 2:
            assert not truncated.any()
    assert (truncated | terminated).all(), "cut after HORIZON decisions"
    assert all(tuple(z.tolist()) in real_z for z in obs[:, :4]) and not torch.equal(final_obs, obs)
    assert not done.all() or envs.dream.t.eq(0).all()
    before = envs.episodes
    envs.skip(5)
    assert envs.episodes == before + 5 * 6, "a resumed run moves past the seeds it trained on"


def test_critical_states_are_the_approach_to_a_loss_of_the_road_and_are_drawn_by_weight():
    from dream import critical_states

    # 30 decisions on the road, 20 lost (the time penalty only), 10 back on it: the loss starts where the next
    # 10 decisions earn nothing (decision 29: one more tile, then 9 penalties), 20 before it and 10 after count
    reward = np.r_[np.full(30, 3.0), np.full(20, -0.4), np.full(10, 3.0)].astype(np.float32)
    assert np.flatnonzero(critical_states(reward)).tolist() == list(range(9, 39))
    assert not critical_states(np.full(40, 3.0)).any(), "a clean lap has no critical state"
    assert not critical_states(np.r_[np.full(40, 3.0), np.full(5, -0.4)]).any(), "a tail shorter than the window"

    model = build_world_model(TINY).eval()
    rng = np.random.default_rng(0)
    episode = {"mu": rng.normal(size=(60, 4)).astype(np.float32), "action": rng.uniform(0, 1, (60, 3)),
               "reward": reward}
    uniform, weighted = ReplayStarts(model, [episode]), ReplayStarts(model, [episode], critical_weight=4.0)
    assert torch.equal(uniform.z, weighted.z) and weighted.critical_share == 0.5
    draws = torch.rand(20_000, generator=torch.Generator().manual_seed(0))
    z_to_step = {tuple(z.tolist()): step for step, z in enumerate(torch.as_tensor(episode["mu"]))}
    for starts, expected in ((uniform, 0.5), (weighted, 4 * 30 / (4 * 30 + 30))):
        steps = np.array([z_to_step[tuple(z.tolist())] for z in starts.sample(draws)[0]])
        assert abs(np.mean((steps >= 9) & (steps < 39)) - expected) < 0.02
    with pytest.raises(ValueError, match="positive"):
        ReplayStarts(model, [episode], critical_weight=0.0)


def test_ppo_in_imagination_learns_to_press_the_gas(tmp_path):
    from utils_rl import PPOArgs, train_ppo

    model = gas_pays_world_model()  # reward tanh(gas) at every step
    ckpt = make_checkpoint_dir(tmp_path, world_model=model)
    starts = ReplayStarts(model, random_latent_episodes())
    torch.manual_seed(0)
    envs = ImaginedFeatureEnvs(BatchedDream(model, starts.z[:2], torch.zeros(2, 4), 32, max_steps=1000), starts, 4)
    args = PPOArgs(ckpt_dir=ckpt, log_dir=tmp_path / "runs", num_envs=32, rollout_steps=4, total_steps=32 * 4 * 25,
                   hidden_dim=32, learning_rate=3e-3, eval_every=0, device="cpu", minibatches=4)
    train_ppo(args, envs, "ppo_dream", torch.device("cpu"))
    agent = load_agent(ckpt, "ppo_dream")
    gas = np.mean([agent.act(np.zeros((64, 64, 3), np.uint8))[1] for _ in range(5)])
    assert gas > 0.72, f"the initial policy's gas is 0.5; trained {gas:.2f}"

    # one more update, checked in the dream only (no real tracks): a re-run with nothing to do returns that check
    args.total_steps, args.eval_every, args.eval_episodes = 32 * 4 * 26, 1, 0
    for _ in range(2):
        envs = ImaginedFeatureEnvs(BatchedDream(model, starts.z[:2], torch.zeros(2, 4), 32, max_steps=1000), starts, 4)
        metrics = train_ppo(args, envs, "ppo_dream", torch.device("cpu"), lambda model: {"dream_return": 1.5})
        assert metrics["dream_return"] == 1.5 and "real_return" not in metrics


def test_collection_keeps_one_step_per_decision_at_the_action_repeat(tmp_path):
    collect_episodes(tmp_path / "data", [3], max_steps=40, workers=1, policy_kwargs={"action_repeat": 4},
                     progress=False)
    held = load_episode(episode_path(tmp_path / "data", "random", 3), ("reward", "action", "truncated",
                                                                        "action_repeat"))
    assert int(held["action_repeat"]) == 4 and len(held["reward"]) == 10 and held["truncated"][-1]
    collect_episodes(tmp_path / "one", [3], max_steps=40, workers=1, policy_kwargs={"action_repeat": 1},
                     progress=False)
    assert len(load_episode(episode_path(tmp_path / "one", "random", 3))["reward"]) == 40


def test_world_model_stage_trains_at_the_episodes_clock(tmp_path):
    from conftest import make_episode
    from episodes import save_episode

    ckpt = make_checkpoint_dir(tmp_path)
    data = tmp_path / "data"
    for seed in range(3):
        save_episode(episode_path(data, "random", seed), make_episode(12, seed) | {"action_repeat": 4})
    save_episode(episode_path(data, "old", 9), make_episode(12, 9))  # collected before the clock: 1 frame
    common = ["train_world_model.py", "--data-dir", str(data), "--ckpt-dir", str(ckpt), "--log-dir",
              str(tmp_path / "runs"), "--epochs", "1", "--hidden-dim", "16", "--batch-size", "2", "--no-collect"]
    result = run_script(*common, "--action-repeat", "4")
    assert result.returncode == 0, result.stderr
    assert "skipping 1 episodes collected at another action repeat" in result.stdout
    wm = torch.load(ckpt / "world_model.pt", weights_only=True)
    assert wm["config"]["action_repeat"] == 4
    missing = run_script(*common, "--action-repeat", "2", "--fresh")
    assert missing.returncode == 2 and "collect_data.py --action-repeat 2" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_an_agent_decides_at_its_world_models_clock(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path, action_repeat=4)
    save_actor_critic(ckpt, "ppo")  # (deciding every frame)
    with pytest.raises(UserError, match="decides every 1 frames but .* steps every 4"):
        load_agent(ckpt, "ppo")


def test_evaluation_with_held_decisions_equals_the_frame_by_frame_agent(tmp_path):
    """evaluate_agent plays decisions in an env that holds them (only the last frame drawn); an agent that
    holds its own action frame by frame in the plain env must score exactly the same."""
    from envs import make_env
    from rollouts import drive

    ckpt = make_checkpoint_dir(tmp_path, action_repeat=3)
    save_linear_controller(ckpt, seed=3)  # its config says action_repeat 1: put it at the world model's clock
    checkpoint = torch.load(controller_path(ckpt, "cmaes"), weights_only=True)
    checkpoint["config"]["action_repeat"] = 3
    save_checkpoint(controller_path(ckpt, "cmaes"), checkpoint)
    result = evaluate_agent(ckpt, "cmaes", episodes=2, seed=11, workers=1, max_steps=60, progress=False)
    agent, env = load_agent(ckpt, "cmaes"), make_env("fast", 60)
    for i, expected in enumerate(result["returns"]):  # frame by frame: the agent holds its own decisions
        assert sum(step.reward for step in drive(env, agent, 11 + i, 60)) == pytest.approx(expected, abs=1e-4)
    env.close()
    noisy = [evaluate_agent(ckpt, "cmaes", episodes=2, seed=11, workers=1, max_steps=60, progress=False,
                            noise=0.3) for _ in range(2)]
    assert noisy[0]["returns"] == noisy[1]["returns"] and noisy[0]["noise"] == 0.3, "noise is seeded per track"
    assert result["frames"] == 2 * 60


def test_the_calibrated_world_model_weight_follows_the_dream_s_rate_of_losing_the_road():
    from train_dream_loop import MAX_CRITICAL_WEIGHT, Args, world_model_weight

    args = Args(calibrate=True, wm_critical_weight=2.0)
    assert world_model_weight(args, [], {}) == 2.0  # round 0: no calibration yet
    last = [{"wm_critical_weight": 4.0}]
    too_rare = world_model_weight(args, last, {"road_loss_real": 0.35, "road_loss_dream": 0.08})
    assert too_rare == pytest.approx(4.0 * math.sqrt(0.36 / 0.09))  # 4x too rare (with the 1% floor): twice the weight
    too_often = world_model_weight(args, last, {"road_loss_real": 0.08, "road_loss_dream": 0.35})
    assert too_often == pytest.approx(2.0) and world_model_weight(
        args, last, {"road_loss_real": 0.2, "road_loss_dream": 0.2}) == 4.0  # calibrated: kept
    assert world_model_weight(args, last, {"road_loss_real": 0.9, "road_loss_dream": 0.0}) == MAX_CRITICAL_WEIGHT
    assert world_model_weight(args, [{"wm_critical_weight": 1.0}],
                              {"road_loss_real": 0.0, "road_loss_dream": 0.5}) == 1.0  # never below uniform
    assert world_model_weight(args, last, {"road_loss_real": math.nan, "road_loss_dream": math.nan}) == 4.0
    fixed = Args(wm_critical_weight=3.0)  # without --calibrate the weight is the flag's, whatever was measured
    assert world_model_weight(fixed, last, {"road_loss_real": 0.35, "road_loss_dream": 0.08}) == 3.0


def test_the_dream_loop_trains_its_world_model_with_its_reward_loss(tmp_path, monkeypatch):
    """The loop's reward-loss flags reach train_world_model.py, round after round (its epochs grow per round)."""
    import train_dream_loop

    seen = []
    monkeypatch.setattr(train_dream_loop.train_world_model, "main", seen.append)
    monkeypatch.setattr(train_dream_loop.train_ppo_in_dream, "main", lambda args: {})
    args = train_dream_loop.Args(ckpt_dir=tmp_path, reward_overshoot_weight=3.0, reward_overshoot_where="no-tile",
                                 reward_huber_delta=2.5)
    train_dream_loop.train_member(args, 2, 0, wm_weight=1.5)
    (wm_args,) = seen
    assert (wm_args.reward_overshoot_weight, wm_args.reward_overshoot_where, wm_args.reward_huber_delta) == (
        3.0, "no-tile", 2.5)
    assert wm_args.critical_weight == 1.5 and wm_args.epochs == args.wm_epochs + 2 * args.wm_epochs_per_round


def test_the_dream_loop_runs_two_rounds_and_resumes(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path, action_repeat=4)
    (ckpt / "world_model.pt").unlink()  # the loop trains its own on the episodes it collects
    common = ["train_dream_loop.py", "--data-dir", str(tmp_path / "data"), "--ckpt-dir", str(ckpt), "--log-dir",
              str(tmp_path / "runs"), "--random-episodes", "3", "--episodes-per-round", "1", "--wm-epochs", "1",
              "--wm-epochs-per-round", "1", "--updates-per-round", "1", "--num-envs", "8", "--horizon", "4",
              "--check-episodes", "1", "--workers", "1", "--max-steps", "40", "--deterministic-share", "1"]
    first = run_script(*common, "--rounds", "1")
    assert first.returncode == 0, first.stderr
    second = run_script(*common, "--rounds", "2")
    assert second.returncode == 0, second.stderr
    assert "resuming: 1 rounds done" in second.stdout and "== round 1:" in second.stdout
    records = json.loads((ckpt / "dream_loop.json").read_text())["rounds"]
    assert [r["round"] for r in records] == [0, 1] and records[1]["real_frames"] > records[0]["real_frames"]
    # round 1's calibration ran on its noise-free episode (10 decisions: too short for a 30-decision look-ahead)
    assert "road_loss_real" not in records[0] and math.isnan(records[1]["road_loss_dream"])
    assert [r["wm_critical_weight"] for r in records] == [4.0, 4.0]  # the default
    assert len(list_episodes(tmp_path / "data", ["round1"])) == 1 and (ckpt / "dream_loop.png").exists()
    assert load_agent(ckpt, "ppo_dream").action_repeat == 4
    kept = [ckpt / "rounds" / f"round{r}" for r in (0, 1)]  # each round's world model and controller, as they were
    assert file_sha256(kept[1] / "controller_ppo_dream.pt") == file_sha256(ckpt / "controller_ppo_dream.pt")
    assert file_sha256(kept[0] / "world_model.pt") != file_sha256(kept[1] / "world_model.pt")
    too_far = run_script(*common, "--rounds", "2", "--snapshots", "3", "--snapshot-spacing", "1")
    assert too_far.returncode == 2 and "needs rounds that exist" in too_far.stderr and "Traceback" not in too_far.stderr
    snapshots = run_script(*common, "--rounds", "2", "--snapshots", "2", "--snapshot-spacing", "1")
    assert snapshots.returncode == 0, snapshots.stderr  # nothing left to train: rounds 1 and 0 act together
    assert "resuming: 2 rounds done" in snapshots.stdout and "== round" not in snapshots.stdout
    ensemble = load_agent(ckpt, "ensemble")
    assert len(ensemble.members) == 2 and agent_dir_and_controller(ckpt, None) == (ckpt, "ensemble")
    # the earlier round's files are named where the loop kept them (inside CKPT_DIR), not copied
    assert kept[0] / "world_model.pt" in agent_files_of(ckpt, "ensemble") and not (ckpt / "member1").exists()
    other = run_script(*[arg if arg != str(tmp_path / "data") else str(tmp_path / "other") for arg in common],
                       "--rounds", "3")
    assert other.returncode == 2 and "run with other data_dir" in other.stderr and "Traceback" not in other.stderr
    missing = run_script("train_ppo_in_dream.py", "--ckpt-dir", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "not found" in missing.stderr and "Traceback" not in missing.stderr


def test_the_dream_loop_trains_an_ensemble_that_drives(tmp_path):
    """--members 2: two world models and controllers (own seeds) on one data set; their ensemble drives round 1."""
    ckpt = make_checkpoint_dir(tmp_path, action_repeat=4)
    (ckpt / "world_model.pt").unlink()
    common = ["train_dream_loop.py", "--data-dir", str(tmp_path / "data"), "--ckpt-dir", str(ckpt), "--log-dir",
              str(tmp_path / "runs"), "--random-episodes", "3", "--episodes-per-round", "1", "--wm-epochs", "1",
              "--wm-epochs-per-round", "1", "--updates-per-round", "1", "--num-envs", "8", "--horizon", "4",
              "--check-episodes", "1", "--workers", "1", "--max-steps", "40"]
    result = run_script(*common, "--rounds", "2", "--members", "2", "--precision", "bf16")  # (bf16's whole path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ensemble of 2: real env") == 2 and "== round 1:" in result.stdout
    ensemble = load_agent(ckpt, "ensemble")
    assert len(ensemble.members) == 2 and agent_dir_and_controller(ckpt, None) == (ckpt, "ensemble")
    weights = [torch.load(d / "controller_ppo_dream.pt", weights_only=True)["state_dict"]["actor.0.weight"]
               for d in (ckpt, ckpt / "member1")]
    assert not torch.equal(*weights), "each member trains with its own seed"
    records = json.loads((ckpt / "dream_loop.json").read_text())["rounds"]
    assert all(math.isfinite(r["real_return"]) and math.isfinite(r["dream_return"]) for r in records)
    assert len(list_episodes(tmp_path / "data", ["round1"])) == 1
    assert file_sha256(ckpt / "rounds" / "round1" / "member1" / "world_model.pt") == file_sha256(
        ckpt / "member1" / "world_model.pt")
    other = run_script(*common, "--rounds", "3")  # the same run with one member is another recipe
    assert other.returncode == 2 and "members=2" in other.stderr and "Traceback" not in other.stderr
