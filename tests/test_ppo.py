import json
import math

import numpy as np
import pytest
import torch
from test_controllers import gas_pays_world_model

import smoke
from actor_critic import ActorCritic, ControllerConfig
from agent import Agent, controller_path, load_agent, load_vae_and_world_model
from conftest import make_checkpoint_dir, run_script
from dream import BatchedDream, DreamFeatureEnvs
from envs import RealFeatureEnvs, TrainingShaping, _PreprocessedEnv
from utils import UserError, autocast, load_checkpoint, save_checkpoint
from utils_rl import PPOArgs, gae, ppo_update, train_ppo


def test_gae_matches_a_plain_reference_loop():
    torch.manual_seed(0)
    steps, envs, gamma, lam = 9, 3, 0.9, 0.8
    rewards, values, last_value = torch.randn(steps, envs), torch.randn(steps, envs), torch.randn(envs)
    dones = torch.rand(steps, envs) < 0.3
    advantages, targets = gae(rewards, values, dones, last_value, gamma, lam)
    for n in range(envs):
        for t in range(steps):
            expected, discount = 0.0, 1.0
            for k in range(t, steps):  # sum of (gamma lam)^(k-t) delta_k, up to the episode's end
                next_value = last_value[n] if k == steps - 1 else values[k + 1, n]
                delta = rewards[k, n] + gamma * next_value * (not dones[k, n]) - values[k, n]
                expected += discount * delta
                if dones[k, n]:
                    break
                discount *= gamma * lam
            assert advantages[t, n].item() == pytest.approx(float(expected), abs=1e-5)
    torch.testing.assert_close(targets, advantages + values)


def unit_to_sample(distribution: str, unit: torch.Tensor) -> torch.Tensor:
    return (unit + 1) / 2 if distribution == "beta" else torch.atanh(unit)


@pytest.mark.parametrize("distribution", ["beta", "tanh_normal"])
def test_actor_log_prob_is_a_density_on_the_bounded_action(distribution):
    torch.manual_seed(1)
    model = ActorCritic(ControllerConfig(kind="actor_critic", obs_dim=4, hidden_dim=8, distribution=distribution))
    with torch.no_grad():
        model.actor[-1].weight.normal_(0, 0.5)  # a policy that is not just the initial one
        dist = model.policy(torch.randn(1, 4))
        points = 60  # midpoint rule over the unit action box [-1, 1]^3
        axis = -1 + (torch.arange(points) + 0.5) * 2 / points
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
        mass = dist.log_prob(unit_to_sample(distribution, grid)).exp().sum() * (2 / points) ** 3
        assert mass.item() == pytest.approx(1.0, abs=0.03)
        samples = torch.cat([dist.sample() for _ in range(4000)])
        unit = dist.unit_action(samples)
        assert unit.abs().max() <= 1
        if distribution == "beta":  # closed-form entropy = the Monte-Carlo estimate -E[log p]
            assert dist.entropy().item() == pytest.approx(-dist.log_prob(samples).mean().item(), abs=0.08)
        else:
            assert math.isfinite(dist.entropy().item())
        actions = model(torch.randn(50, 4))
        assert actions[:, 0].abs().max() <= 1 and actions[:, 1:].min() >= 0 and actions[:, 1:].max() <= 1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("distribution", ["beta", "tanh_normal"])
def test_one_ppo_update_changes_the_policy_and_stays_finite(distribution, precision):
    torch.manual_seed(2)
    model = ActorCritic(ControllerConfig(kind="actor_critic", obs_dim=4, hidden_dim=16, distribution=distribution))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    obs = torch.randn(64, 4)
    with torch.no_grad():
        dist = model.policy(obs)
        sample = dist.sample()
        log_prob = dist.log_prob(sample)
    advantage = torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)
    before = [p.detach().clone() for p in model.parameters()]
    with autocast("cpu", precision):
        assert model.policy(obs).log_prob(sample).dtype == model.value(obs).dtype == torch.float32
        metrics = ppo_update(model, optimizer, {"obs": obs, "sample": sample, "log_prob": log_prob,
                                                "advantage": advantage, "value_target": torch.randn(64)},
                             epochs=2, minibatches=2, clip_coef=0.2, ent_coef=0.01, vf_coef=0.5, max_grad_norm=0.5)
    assert all(math.isfinite(value) for value in metrics.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        change = model.policy(obs).log_prob(sample) - log_prob
    assert change[advantage > 0].mean() > change[advantage < 0].mean(), "good actions became likelier"


def tiny_ppo_args(ckpt, tmp_path, **overrides) -> PPOArgs:
    values = dict(ckpt_dir=ckpt, log_dir=tmp_path / "runs", num_envs=16, rollout_steps=20, total_steps=16 * 20 * 20,
                  max_steps=20, hidden_dim=32, learning_rate=3e-3, eval_every=0, device="cpu", minibatches=4)
    return PPOArgs(**(values | overrides))


def tiny_dream_envs(model, precision="fp32") -> DreamFeatureEnvs:
    """16 dreams of 20 steps in MODEL from 3 fixed starts (z 0, log-std -2)."""
    return DreamFeatureEnvs(BatchedDream(model, torch.zeros(3, 4), torch.full((3, 4), -2.0), 16, max_steps=20,
                                         precision=precision))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_ppo_in_a_tiny_dream_learns_to_press_the_gas(tmp_path, precision):
    """(bf16: the dream's steps and PPO's update in bf16 mixed precision learn it too)"""
    model = gas_pays_world_model()  # reward tanh(gas) at every step
    ckpt = make_checkpoint_dir(tmp_path, world_model=model)
    torch.manual_seed(0)
    metrics = train_ppo(tiny_ppo_args(ckpt, tmp_path, precision=precision), tiny_dream_envs(model, precision),
                        "ppo_dream", torch.device("cpu"))
    agent = load_agent(ckpt, "ppo_dream")
    gas = np.mean([agent(np.zeros((64, 64, 3), np.uint8))[1] for _ in range(5)])
    assert gas > 0.72, f"the initial policy's gas is 0.5; trained {gas:.2f}"
    assert metrics["dream_episode_return"] > 20 * math.tanh(0.6)  # 9.2 at the start


def test_real_feature_envs_reset_memory_and_return_the_last_frame(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    envs = RealFeatureEnvs(ckpt, num_envs=2, max_steps=3, seed=5, workers=1)
    try:
        obs = envs.reset()
        actions = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0]])
        assert torch.all(obs[:, 4:] == 0), "h starts at the world model's initial state"
        for step in range(3):
            obs, reward, terminated, truncated, final_obs = envs.step(actions)
            if step < 2:
                assert not truncated.any() and torch.equal(final_obs, obs) and torch.all(obs[:, 4:] != 0)
        assert truncated.all() and not terminated.any()
        assert torch.all(obs[:, 4:] == 0), "a new episode starts with a fresh memory"
        assert torch.all(final_obs[:, 4:] != 0) and not torch.equal(final_obs[:, :4], obs[:, :4])
    finally:
        envs.close()


def test_action_repeat_is_the_held_frames_and_draws_only_the_last():
    held, plain_env = _PreprocessedEnv("fast", 1000, action_repeat=4), _PreprocessedEnv("fast", 1000)
    action = np.array([0.1, 0.6, 0.0], np.float32)
    try:
        assert np.array_equal(held.reset(seed=3)[0], plain_env.reset(seed=3)[0])
        drawn, render = [], held.unwrapped._render

        def counting_render(mode):
            frame = render(mode)
            drawn.append(frame is not None)
            return frame

        held.unwrapped._render = counting_render
        for _ in range(10):
            frame, reward, *_ = held.step(action)
            rewards = [plain_env.step(action)[1] for _ in range(4)]
            assert np.array_equal(frame, plain_env.observation(plain_env.unwrapped.state))
            assert reward == pytest.approx(sum(rewards))
        assert len(drawn) == 40 and sum(drawn) == 10, "one frame drawn per decision"
    finally:
        held.close(), plain_env.close()


def test_no_progress_stop_ends_mid_decision_with_a_drawn_frame():
    env = _PreprocessedEnv("fast", 1000, action_repeat=4, shaping=TrainingShaping(no_progress_frames=30))
    try:
        env.reset(seed=1)
        for decision in range(1, 100):
            frame, reward, terminated, truncated, _ = env.step(np.zeros(3, np.float32))  # no gas: no new tiles
            if terminated:
                break
        assert terminated and not truncated and decision < 20, "standing still ends the training episode"
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        assert env.unwrapped.draw_state, "the next reset draws its frame"
    finally:
        env.close()


def test_agent_holds_each_action_for_its_action_repeat(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    vae, world_model, _ = load_vae_and_world_model(ckpt)
    calls = []

    def controller(features):
        calls.append(features)
        return torch.full((1, 3), 0.1 * len(calls))

    agent = Agent(vae, [(world_model, controller)], action_repeat=3)
    frames = np.random.default_rng(0).integers(0, 255, (7, 64, 64, 3), dtype=np.uint8)
    actions = [agent(frame)[0] for frame in frames]
    assert len(calls) == 3 and actions == pytest.approx([0.1] * 3 + [0.2] * 3 + [0.3])
    agent.reset(0)
    agent(frames[0])
    assert len(calls) == 4 and torch.all(calls[-1][:, 4:] == 0), "a reset agent decides at once, fresh memory"


def test_agent_noise_is_seeded_by_the_track_and_remembered(tmp_path):
    """An agent with exploration noise draws it from reset(seed): the same track, the same actions; its memory
    h steps on the action it took, noise included (the action the world model is trained on)."""
    vae, world_model, _ = load_vae_and_world_model(make_checkpoint_dir(tmp_path))
    frames = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)
    agent = Agent(vae, [(world_model, lambda features: torch.full((1, 3), 0.5))], noise=0.2)

    def play(seed):
        agent.reset(seed)
        return np.stack([agent.act(frame) for frame in frames])

    first, again, other = play(7), play(7), play(8)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other) and not np.allclose(first, 0.5)
    assert first[:, 0].min() >= -1 and first[:, 1:].min() >= 0 and first.max() <= 1
    agent.reset(7)
    agent.act(frames[0])
    expected = world_model.step(agent.features.z, torch.from_numpy(first[:1]), world_model.initial_state(1))[1]
    assert torch.allclose(agent.features.state, expected), "h remembers the noisy action that was taken"


def test_ppo_stages_checkpoint_resume_and_evaluate(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path, action_repeat=2)  # both controllers decide at the world model's clock
    common = ["--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs")]
    dream = ["train_ppo_in_dream.py", *common, *smoke.TINY["train_ppo_in_dream"], "--no-replay"]
    first = run_script(*dream, "--total-steps", "128")
    assert first.returncode == 0, first.stderr
    second = run_script(*dream, "--total-steps", "256")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout
    checkpoint = load_checkpoint(controller_path(ckpt, "ppo_dream"))
    assert checkpoint["update"] == 2 and checkpoint["env_steps"] == 256 and "optimizer" not in checkpoint
    assert checkpoint["config"]["action_repeat"] == 2
    assert checkpoint["world_model"]["sha256"] and checkpoint["vae"]["sha256"]

    real = run_script("train_ppo.py", *common, *smoke.TINY["train_ppo"], "--eval-every", "2", "--eval-episodes", "1",
                      "--init-from", str(controller_path(ckpt, "ppo_dream")))  # the real env fine-tunes it
    assert real.returncode == 0, real.stderr
    assert "update 2: real env" in real.stdout + real.stderr
    assert "starting from the weights of" in real.stdout
    checkpoint = load_checkpoint(controller_path(ckpt, "ppo"))
    assert checkpoint["env_steps"] == 64 and checkpoint["config"]["action_repeat"] == 2, "env steps count frames"
    assert load_agent(ckpt, "ppo").action_repeat == 2
    out = tmp_path / "eval.json"
    result = run_script("evaluate.py", "--ckpt-dir", str(ckpt), "--controller", "ppo", "--episodes", "2",
                        "--max-steps", "20", "--workers", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())["controller"] == "ppo"


def test_ppo_controller_damage_is_one_clear_error(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    with pytest.raises(UserError, match="not found.*train_ppo.py"):
        load_agent(ckpt, "ppo")
    config = ControllerConfig(kind="actor_critic", obs_dim=20, hidden_dim=8)
    from utils import checkpoint_identity, plain

    save_checkpoint(controller_path(ckpt, "ppo"), {
        "config": plain(config), "state_dict": ActorCritic(config).state_dict(),
        "vae": checkpoint_identity(ckpt / "vae.pt"), "world_model": {"sha256": "another"}})
    with pytest.raises(UserError, match="trained with another world model.*train_ppo.py"):
        load_agent(ckpt, "ppo")
    save_checkpoint(controller_path(ckpt, "ppo"), {
        "config": plain(config) | {"hidden_dim": 16}, "state_dict": ActorCritic(config).state_dict(),
        "vae": checkpoint_identity(ckpt / "vae.pt"), "world_model": checkpoint_identity(ckpt / "world_model.pt")})
    with pytest.raises(UserError, match="not a controller checkpoint"):
        load_agent(ckpt, "ppo")
    result = run_script("train_ppo.py", "--ckpt-dir", str(tmp_path / "missing"))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "not found" in result.stderr


def test_train_ppo_closes_the_envs_however_it_ends(tmp_path):
    """The env worker processes end with train_ppo, also when it stops on bad settings before its loop."""
    ckpt = make_checkpoint_dir(tmp_path)

    class Envs:
        num_envs, obs_dim, action_repeat, kind, closed = 2, 20, 1, "fake", False

        def close(self):
            self.closed = True

    envs = Envs()
    with pytest.raises(UserError, match="must hold at least one rollout"):
        train_ppo(PPOArgs(ckpt_dir=ckpt, log_dir=tmp_path / "runs", total_steps=1, num_envs=2), envs, "ppo", "cpu")
    assert envs.closed


def test_a_resumed_real_run_starts_on_other_tracks(tmp_path):
    """train_ppo moves the envs past what the run already drew (envs.skip): a resume does not replay its tracks."""
    ckpt = make_checkpoint_dir(tmp_path)
    first_frames = []
    for skip in (0, 0, 128):
        envs = RealFeatureEnvs(ckpt, num_envs=1, max_steps=50, seed=3, workers=1)
        try:
            envs.skip(skip)
            first_frames.append(envs.reset().numpy())  # [z, h] of the first frame: z tells the tracks apart
        finally:
            envs.close()
    assert np.array_equal(first_frames[0], first_frames[1]), "the same start, the same track"
    assert not np.array_equal(first_frames[0], first_frames[2]), "a resumed run starts on another track"


def test_weight_averaging_ships_the_average_and_resumes_the_raw_weights(tmp_path):
    """With --weight-average the controller file holds the moving average of the weights; training goes on
    from the raw weights (kept in the latest checkpoint with the average), and a resume continues both."""
    model = gas_pays_world_model()
    ckpt = make_checkpoint_dir(tmp_path, world_model=model)

    def run(updates: int) -> dict:
        args = tiny_ppo_args(ckpt, tmp_path, total_steps=16 * 20 * updates, weight_average=0.5)
        return train_ppo(args, tiny_dream_envs(model), "ppo_dream", torch.device("cpu"))

    run(2)
    latest = load_checkpoint(ckpt / "ppo_dream_latest.pt")
    shipped = load_checkpoint(controller_path(ckpt, "ppo_dream"))
    assert not {"trained_state_dict", "averaged_model", "optimizer"} & set(shipped)
    averaged = {name.removeprefix("module."): value for name, value in latest["averaged_model"].items()
                if name.startswith("module.")}
    for name, value in shipped["state_dict"].items():
        assert torch.equal(value, averaged[name]), name
    assert any(not torch.equal(value, latest["trained_state_dict"][name])
               for name, value in shipped["state_dict"].items()), "the average is not the last weights"
    assert int(latest["averaged_model"]["n_averaged"]) == 2
    run(3)
    assert int(load_checkpoint(ckpt / "ppo_dream_latest.pt")["averaged_model"]["n_averaged"]) == 3
    assert load_checkpoint(controller_path(ckpt, "ppo_dream"))["update"] == 3


def test_keep_best_ships_the_best_checked_controller_across_a_resume(tmp_path, monkeypatch):
    """With keep_best the controller file ends as the one whose real check scored best (ties: the earliest),
    the last one stays in the latest checkpoint, and a resumed run remembers the best of its first part."""
    import utils_rl

    ckpt = make_checkpoint_dir(tmp_path, world_model=gas_pays_world_model())
    scores = iter([5.0, 9.0, 9.0, 3.0, 12.0])  # the checks of updates 1, 2, ... in turn
    checked = {}  # update -> the weights the check played

    def fake_check(ckpt_dir, name, *args, **kwargs) -> dict:
        controller = load_checkpoint(controller_path(ckpt_dir, name))
        checked[controller["update"]] = controller["state_dict"]
        return {"mean": next(scores), "std": 0.0}

    monkeypatch.setattr(utils_rl, "evaluate_agent", fake_check)

    def run(updates: int) -> dict:
        args = tiny_ppo_args(ckpt, tmp_path, total_steps=16 * 20 * updates, eval_every=1, eval_episodes=1)
        return train_ppo(args, tiny_dream_envs(gas_pays_world_model()), "ppo", torch.device("cpu"), keep_best=True)

    def shipped_update() -> int:
        shipped = load_checkpoint(controller_path(ckpt, "ppo"))
        assert not {"best_check", "optimizer"} & set(shipped)
        for name, value in shipped["state_dict"].items():
            assert torch.equal(value, checked[shipped["update"]][name]), name
        return shipped["update"]

    run(4)
    assert shipped_update() == 2, "9.0 at update 2 (and again at 3: the earliest wins)"
    latest = load_checkpoint(ckpt / "ppo_latest.pt")
    assert latest["update"] == 4 and latest["best_check"]["update"] == 2
    for name, value in latest["state_dict"].items():
        assert torch.equal(value, checked[4][name]), f"the latest checkpoint keeps the last weights: {name}"
    run(4)  # nothing left to train: the same file again
    assert shipped_update() == 2
    run(5)
    assert shipped_update() == 5, "the resumed run's update 5 checked 12.0, above the first part's 9.0"
    with pytest.raises(UserError, match="needs real checks"):
        train_ppo(tiny_ppo_args(ckpt, tmp_path, eval_every=0), None, "ppo", torch.device("cpu"), keep_best=True)


def test_init_from_starts_a_new_run_at_a_trained_controllers_weights(tmp_path):
    """--init-from: a new real-env run starts from another controller's weights (a dream-trained one, say); a
    play-only copy lends its actor and the critic starts anew; other settings or another world model are refused."""
    model = gas_pays_world_model()
    ckpt = make_checkpoint_dir(tmp_path, world_model=model)
    train_ppo(tiny_ppo_args(ckpt, tmp_path, total_steps=16 * 20 * 2), tiny_dream_envs(model), "ppo_dream",
              torch.device("cpu"))
    trained = load_checkpoint(controller_path(ckpt, "ppo_dream"))

    def start_from(path, **overrides) -> dict:
        """One update at learning rate 0 from PATH: the weights the run started from (no latest checkpoint)."""
        (ckpt / "ppo_latest.pt").unlink(missing_ok=True)
        args = tiny_ppo_args(ckpt, tmp_path, total_steps=16 * 20, learning_rate=0.0, **overrides)
        train_ppo(args, tiny_dream_envs(model), "ppo", torch.device("cpu"), init_from=path)
        return load_checkpoint(controller_path(ckpt, "ppo"))["state_dict"]

    started = start_from(controller_path(ckpt, "ppo_dream"))
    for name, value in trained["state_dict"].items():
        if not name.startswith("obs_norm."):  # (the observation statistics go on updating)
            assert torch.equal(value, started[name]), name
    play_only = tmp_path / "play_only.pt"
    save_checkpoint(play_only, trained | {"play_only": True, "state_dict": {
        name: value for name, value in trained["state_dict"].items() if not name.startswith("critic.")}})
    started = start_from(play_only)
    assert all(torch.equal(value, started[name]) for name, value in trained["state_dict"].items()
               if name.startswith("actor."))
    assert not torch.equal(trained["state_dict"]["critic.0.weight"], started["critic.0.weight"]), "a new critic"
    with pytest.raises(UserError, match="was trained with"):
        start_from(controller_path(ckpt, "ppo_dream"), hidden_dim=16)
    other = make_checkpoint_dir(tmp_path / "other")  # another (random) world model
    with pytest.raises(UserError, match="another world model"):
        train_ppo(tiny_ppo_args(other, tmp_path), tiny_dream_envs(model), "ppo", torch.device("cpu"),
                  init_from=controller_path(ckpt, "ppo_dream"))


def save_partner(ckpt, partner_dir, seed: int = 9):
    """A random PPO controller with a world model of its own (another GRU), seen through CKPT's VAE, as a partner."""
    from conftest import TINY_WORLD_MODEL
    from utils import checkpoint_identity, plain
    from world_model import WorldModelConfig, build_world_model

    torch.manual_seed(seed)
    model = build_world_model(WorldModelConfig(arch="gru", **TINY_WORLD_MODEL))
    save_checkpoint(partner_dir / "world_model.pt", {"config": plain(model.config), "state_dict": model.state_dict(),
                                                     "vae": checkpoint_identity(ckpt / "vae.pt")})
    config = ControllerConfig(kind="actor_critic", obs_dim=model.controller_input_dim, hidden_dim=32)
    controller = ActorCritic(config)
    with torch.no_grad():
        controller.actor[-1].weight.normal_(0, 1.0)  # decided actions, not the initial policy's near-constant one
    path = controller_path(partner_dir, "ppo_dream")
    save_checkpoint(path, {"config": plain(config), "state_dict": controller.state_dict(),
                           "vae": checkpoint_identity(ckpt / "vae.pt"),
                           "world_model": checkpoint_identity(partner_dir / "world_model.pt")})
    return path


def test_a_partner_shares_each_action_as_the_pair_plays(tmp_path):
    """With a partner the envs take the mean of the given action and the partner's deterministic one: the same
    frames and rewards as envs without it given that mean; the partner sees [z, h] of its own world model, whose
    memory steps on that mean (as agent.Agent plays the pair) and restarts with each episode."""
    from agent import FeatureTracker, load_controller, load_world_model

    ckpt = make_checkpoint_dir(tmp_path)
    partner = save_partner(ckpt, tmp_path / "partner")
    partner_controller, _ = load_controller(partner, ckpt, partner.parent / "world_model.pt")
    vae, _, _ = load_vae_and_world_model(ckpt)
    partner_memory = FeatureTracker(vae, load_world_model(partner.parent / "world_model.pt")[0], 2)  # kept here
    paired = RealFeatureEnvs(ckpt, num_envs=2, max_steps=4, seed=5, workers=1, partner=partner)
    alone = RealFeatureEnvs(ckpt, num_envs=2, max_steps=4, seed=5, workers=1)
    try:
        assert paired.partner_identity["controller"]["path"] == str(partner) and alone.partner_identity is None
        assert torch.equal(paired.reset(), alone.reset())
        given = torch.tensor([[0.8, 1.0, 0.0], [-0.6, 0.2, 0.3]])
        for step in range(6):  # (the episodes end after step 3 and start again)
            partner_obs = partner_memory.observe(None, paired.features.z)  # (the shared z of the current frames)
            assert torch.equal(paired.partner_obs, partner_obs)
            with torch.no_grad():
                partner_action = partner_controller(partner_obs)
            assert not torch.allclose(partner_action, given, atol=0.05)
            obs, reward, terminated, truncated, final_obs = paired.step(given)
            expected = alone.step((given + partner_action) / 2)
            assert torch.equal(obs, expected[0]) and torch.equal(reward, expected[1])
            assert torch.equal(final_obs, expected[4]) and torch.equal(truncated, expected[3])
            partner_memory.remember((given + partner_action) / 2)
            partner_memory.reset(truncated | terminated)
            if step == 3:
                assert truncated.all() and torch.all(paired.partner_obs[:, 4:] == 0), "a new episode, a fresh memory"
            else:
                assert torch.all(paired.partner_obs[:, 4:] != 0), "the partner's h remembers the action taken"
    finally:
        paired.close(), alone.close()


def test_train_ppo_with_a_partner_trains_its_part_and_writes_the_pair(tmp_path):
    """train_ppo.py --partner: the checks play the pair, CKPT_DIR ends with the pair as its ensemble (equal weights),
    the checkpoint names the partner, a copy of it elsewhere resumes the run, and a resume beside another partner or
    none, --keep-best, a non-controller file and a partner in CKPT_DIR itself are refused."""
    import shutil

    from utils import file_sha256

    ckpt = make_checkpoint_dir(tmp_path)
    partner = save_partner(ckpt, tmp_path / "partner")
    common = ["--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"), *smoke.TINY["train_ppo"]]
    run = run_script("train_ppo.py", *common, "--eval-every", "2", "--eval-episodes", "1", "--partner", str(partner))
    assert run.returncode == 0, run.stderr
    assert "pair real return" in run.stdout + run.stderr
    checkpoint = load_checkpoint(controller_path(ckpt, "ppo"))
    assert checkpoint["partner"]["controller"]["sha256"] == file_sha256(partner)
    pair = load_agent(ckpt, "ensemble")
    assert len(pair.members) == 2 and torch.equal(pair.weights.flatten(), torch.tensor([0.5, 0.5]))
    for (_, member), path in zip(pair.members, (controller_path(ckpt, "ppo"), partner)):
        assert torch.equal(member.state_dict()["actor.4.weight"], load_checkpoint(path)["state_dict"]["actor.4.weight"])
    moved = shutil.copytree(partner.parent, tmp_path / "moved") / partner.name  # the same files elsewhere
    resumed = run_script("train_ppo.py", *common, "--total-steps", "128", "--partner", str(moved))
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    trained = load_checkpoint(controller_path(ckpt, "ppo"))
    assert trained["update"] == 8 and load_agent(ckpt, "ensemble").members[0][1].state_dict()["actor.4.weight"].equal(
        trained["state_dict"]["actor.4.weight"]), "the pair written again at the end, without checks"
    other = save_partner(ckpt, tmp_path / "other", seed=10)
    resumed = run_script("train_ppo.py", *common, "--total-steps", "192", "--partner", str(other))
    assert resumed.returncode != 0 and "trained beside" in resumed.stderr
    alone = run_script("train_ppo.py", *common, "--total-steps", "192")
    assert alone.returncode != 0 and "not no partner" in alone.stderr
    for flags, message in ((["--partner", str(partner), "--keep-best"], "not with --partner"),
                           (["--partner", str(ckpt / "vae.pt")], "not a controller_<name>.pt"),
                           (["--partner", str(controller_path(ckpt, "ppo"))], "lies in --ckpt-dir")):
        refused = run_script("train_ppo.py", *common, "--fresh", *flags)
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr


def test_checks_do_not_change_the_training_run(tmp_path, monkeypatch):
    """A real check builds models to play (drawing from torch's generator); training's own draws must not move,
    so that one --seed gives one run however often it is checked."""
    import utils_rl

    def check(*args, **kwargs) -> dict:
        torch.rand(7)  # as building the agent to play does
        return {"mean": 0.0, "std": 0.0}

    monkeypatch.setattr(utils_rl, "evaluate_agent", check)
    trained = []
    for eval_every in (0, 1):
        ckpt = make_checkpoint_dir(tmp_path / f"every{eval_every}", world_model=gas_pays_world_model())
        torch.manual_seed(0)
        args = tiny_ppo_args(ckpt, tmp_path, total_steps=16 * 20 * 3, eval_every=eval_every, eval_episodes=1)
        train_ppo(args, tiny_dream_envs(gas_pays_world_model()), "ppo", torch.device("cpu"))
        trained.append(load_checkpoint(controller_path(ckpt, "ppo"))["state_dict"])
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name


def test_off_road_penalty_is_paid_on_the_frames_with_no_wheel_on_the_road():
    penalised = _PreprocessedEnv("fast", 1000, shaping=TrainingShaping(off_road_penalty=5.0))
    plain = _PreprocessedEnv("fast", 1000)
    try:
        penalised.reset(seed=3), plain.reset(seed=3)
        off_road = []
        for _ in range(150):  # full lock and full gas: the car leaves the road within a few seconds
            action = np.array([-1.0, 1.0, 0.0], np.float32)
            paid, earned = penalised.step(action)[1], plain.step(action)[1]
            off = not any(wheel.tiles for wheel in penalised.unwrapped.car.wheels)
            assert paid == pytest.approx(earned - 5.0 * off)
            off_road.append(off)
        assert not off_road[0] and sum(off_road) > 10, "starts on the road, then pays for the grass"
    finally:
        penalised.close(), plain.close()


def test_loss_restarts_replay_the_car_to_where_an_earlier_episode_lost_the_road():
    from envs import LossRestarts, NoProgressStop, make_env

    env = LossRestarts(NoProgressStop(make_env("fast", 1000), 30), share=1.0, before=(5, 20), first_frame=20)
    try:
        env.reset(seed=4)
        assert not env.restarted, "nothing lost yet: an ordinary episode"
        poses, terminated = [], False
        for frame in range(400):  # straight on at first, then full lock: the road is lost, the stop ends it
            action = np.array([0.0, 0.3, 0.0] if frame < 80 else [-1.0, 1.0, 0.0], np.float32)
            terminated = env.step(action)[2]
            car = env.unwrapped.car.hull
            poses.append((*car.position, car.angle))
            if terminated:
                break
        assert terminated and len(env.moments) == 1
        seed, prefix = env.moments[0]
        assert seed == env.seed and 20 <= len(prefix) <= env.last_tile - 5
        frame, _ = env.reset()
        car = env.unwrapped.car.hull
        assert env.restarted and (*car.position, car.angle) == poses[len(prefix) - 1], "the same car, bit for bit"
        assert env.unwrapped.draw_state and frame.shape == (96, 96, 3) and frame is env.unwrapped.state
    finally:
        env.close()
