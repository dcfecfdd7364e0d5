import math

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import dream  # noqa: F401  (registers DreamCarRacing-v0)
import smoke
from agent import load_vae_and_world_model
from conftest import TINY_WORLD_MODEL, make_checkpoint_dir, make_episode, run_script
from conv_vae import ConvVAE, ConvVAEConfig
from dream import BatchedDream
from episodes import encode_episodes, episode_path, latent_cache_path, load_latent_episode, save_episode
from utils import UserError, autocast, save_checkpoint
from world_model import MDNRNN, WorldModelConfig, WorldModelGRU, build_world_model

TINY = TINY_WORLD_MODEL


@pytest.mark.parametrize("arch", ["gru", "mdn"])
def test_stepping_a_sequence_equals_the_sequence_forward(arch):
    torch.manual_seed(0)
    model = build_world_model(WorldModelConfig(arch=arch, **TINY))
    assert isinstance(model, {"gru": WorldModelGRU, "mdn": MDNRNN}[arch])
    z, action = torch.randn(3, 9, 4), torch.rand(3, 9, 3)
    pred, final = model(z, action)
    k = 1 if arch == "gru" else 3
    assert pred.mu.shape == pred.log_sigma.shape == pred.logit_pi.shape == (3, 9, 4, k)
    assert pred.reward.shape == pred.done_logit.shape == (3, 9)
    state = model.initial_state(3)
    assert state.shape == (3, 16 if arch == "gru" else 32)
    steps = []
    for t in range(9):
        step_pred, state = model.step(z[:, t], action[:, t], state)
        steps.append(step_pred)
    for name in pred._fields:
        stepped = torch.stack([getattr(p, name) for p in steps], 1)
        torch.testing.assert_close(stepped, getattr(pred, name), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, final, atol=1e-5, rtol=1e-5)
    assert model.features(state).shape == (3, 16)


def test_mdn_loss_matches_torch_distributions():
    torch.manual_seed(1)
    model = build_world_model(WorldModelConfig(arch="mdn", **TINY))
    pred, _ = model(torch.randn(2, 5, 4), torch.rand(2, 5, 3))
    target = torch.randn(2, 5, 4)
    mixture = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=pred.logit_pi),
        torch.distributions.Normal(pred.mu, pred.log_sigma.exp()))
    reference = mixture.log_prob(target)  # (2, 5, 4)
    torch.testing.assert_close(model.z_log_prob(pred, target), reference, atol=1e-5, rtol=1e-5)
    ones = torch.ones(2, 5)
    losses = model.loss(pred, target, torch.zeros(2, 5), torch.zeros(2, 5), ones, ones)
    torch.testing.assert_close(losses["z_nll"], -reference.mean(), atol=1e-5, rtol=1e-5)


def test_reward_overshoot_weight_punishes_overshooting_more():
    model = build_world_model(WorldModelConfig(arch="gru", **TINY))
    pred, _ = model(torch.randn(1, 4, 4), torch.rand(1, 4, 3))
    ones = torch.ones(1, 4)
    z = torch.randn(1, 4, 4)
    below = model.loss(pred, z, pred.reward.detach() - 1, ones * 0, ones, ones, reward_overshoot_weight=4)["reward"]
    above = model.loss(pred, z, pred.reward.detach() + 1, ones * 0, ones, ones, reward_overshoot_weight=4)["reward"]
    assert below.item() == pytest.approx(4 * above.item())  # target below prediction = overshoot


def test_reward_overshoot_where_no_tile_weighs_only_decisions_that_earned_nothing():
    """With "no-tile", a prediction of 3 against a decision that earned no tile (-0.4) is punished 4x, but against
    one that earned a tile an overshoot (target 1) weighs as an undershoot (target 5): speed is paid in full."""
    model = build_world_model(WorldModelConfig(arch="gru", **TINY))
    pred, _ = model(torch.randn(1, 1, 4), torch.rand(1, 1, 3))
    pred = pred._replace(reward=torch.full((1, 1), 3.0))
    ones, z = torch.ones(1, 1), torch.randn(1, 1, 4)

    def reward_loss(target: float, weight: float = 4, **kwargs) -> float:
        return model.loss(pred, z, torch.full((1, 1), target), ones * 0, ones, ones, reward_overshoot_weight=weight,
                          **kwargs)["reward"].item()
    no_tile = {"reward_overshoot_where": "no-tile"}
    assert reward_loss(-0.4, **no_tile) == pytest.approx(4 * reward_loss(-0.4, weight=1))
    assert reward_loss(1.0, **no_tile) == pytest.approx(reward_loss(5.0, **no_tile))
    assert reward_loss(1.0) == pytest.approx(4 * reward_loss(5.0))  # "all": every overshoot weighs 4
    # delta 4: an error of 2 tiles' worth (3) is squared (the mean), an error of 100 linear (robust)
    assert reward_loss(6.0, reward_huber_delta=4) == pytest.approx(0.5 * 3 ** 2)
    assert reward_loss(103.0, reward_huber_delta=4) == pytest.approx(4 * (100 - 2))
    with pytest.raises(ValueError, match="no-tile"):
        reward_loss(0.0, reward_overshoot_where="grass")


def test_train_world_model_refuses_a_reward_huber_delta_that_is_not_positive(tmp_path):
    import train_world_model

    with pytest.raises(UserError, match="--reward-huber-delta positive"):
        train_world_model.main(train_world_model.Args(data_dir=tmp_path, ckpt_dir=tmp_path, log_dir=tmp_path,
                                                      reward_huber_delta=0))


def test_temperature_changes_the_spread_of_samples():
    torch.manual_seed(2)
    model = build_world_model(WorldModelConfig(arch="mdn", **TINY))
    pred, _ = model.step(torch.zeros(1, 4), torch.zeros(1, 3), model.initial_state(1))
    pred = pred._replace(**{name: getattr(pred, name).expand(4000, *getattr(pred, name).shape[1:])
                            for name in ("logit_pi", "mu", "log_sigma")})
    spread = {}
    for tau in (0.0, 0.3, 1.0, 1.5):
        samples = model.sample_next(pred, tau, torch.rand(4000, 4), torch.randn(4000, 4))
        spread[tau] = samples.std(0).mean().item()
    assert spread[0.0] == 0.0 and spread[0.3] < spread[1.0] < spread[1.5]


@pytest.mark.parametrize("arch", ["gru", "mdn"])
def test_a_tiny_training_run_lowers_the_loss(arch):
    torch.manual_seed(3)
    model = build_world_model(WorldModelConfig(arch=arch, **TINY))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    t = torch.arange(30, dtype=torch.float32)
    z = torch.stack([torch.sin(t / 3 + i) for i in range(4)], -1).expand(4, 30, 4)  # a predictable sequence
    action, ones = torch.zeros(4, 29, 3), torch.ones(4, 29)
    reward, done = torch.full((4, 29), 0.5), torch.zeros(4, 29)
    losses = []
    for _ in range(60):
        pred, _ = model(z[:, :-1], action)
        loss = model.loss(pred, z[:, 1:], reward, done, ones, ones)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0


@pytest.mark.parametrize("arch", ["gru", "mdn"])
def test_bf16_keeps_the_state_heads_and_loss_in_fp32_and_steps_close_to_fp32(arch):
    torch.manual_seed(0)
    model = build_world_model(WorldModelConfig(arch=arch, **TINY))
    z, action = torch.randn(3, 9, 4), torch.rand(3, 9, 3)
    reference, _ = model(z, action)
    with autocast("cpu", "bf16"):
        pred, final = model(z, action)
        state = model.initial_state(3)
        for t in range(9):
            step_pred, state = model.step(z[:, t], action[:, t], state)
    assert all(value.dtype == torch.float32 for value in (*pred, final, *step_pred, state))
    torch.testing.assert_close(pred.mu, reference.mu, atol=0.05, rtol=0.05)  # bf16 keeps ~3 significant digits
    ones = torch.ones(3, 8)
    loss = model.loss(type(pred)(*(x[:, :-1] for x in pred)), z[:, 1:], ones, 0 * ones, ones, ones)["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    with pytest.raises(UserError, match="fp32 or bf16"):
        autocast("cpu", "fp16")


def test_dream_env_passes_check_env_and_renders(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    env = gym.make("DreamCarRacing-v0", ckpt_dir=str(ckpt), render_mode="rgb_array", max_steps=20)
    check_env(env.unwrapped, skip_render_check=False)
    obs, _ = env.reset(seed=3)
    assert obs.shape == (4 + 16,) and obs.dtype == np.float32
    obs, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert isinstance(reward, float) and isinstance(terminated, bool)
    frame = env.render()
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8


@pytest.mark.parametrize("arch", ["gru", "mdn"])
def test_batched_dream_matches_single_envs_with_the_same_seeds(tmp_path, arch):
    ckpt = make_checkpoint_dir(tmp_path, arch)
    _, model, checkpoint = load_vae_and_world_model(ckpt)
    bank = checkpoint["start_bank"]
    seeds = [11, 12, 13, 14]
    actions = torch.rand(25, 4, 3) * torch.tensor([2.0, 1.0, 1.0]) - torch.tensor([1.0, 0.0, 0.0])
    batched = BatchedDream(model, bank["mu"], bank["logvar"], 4, temperature=1.0, max_steps=20)
    batch_obs = [batched.reset(seeds)]
    batch_out = [batched.step(actions[t]) for t in range(25)]
    for i, seed in enumerate(seeds):
        single = BatchedDream(model, bank["mu"], bank["logvar"], 1, temperature=1.0, max_steps=20)
        torch.testing.assert_close(single.reset([seed])[0], batch_obs[0][i])
        for t in range(25):
            obs, reward, terminated, truncated = single.step(actions[t, i:i + 1])
            torch.testing.assert_close(obs[0], batch_out[t][0][i], atol=1e-5, rtol=1e-5)
            assert reward[0].item() == pytest.approx(batch_out[t][1][i].item(), abs=1e-5)
            assert bool(truncated[0]) == bool(batch_out[t][3][i]) == (t + 1 >= 20 and not bool(terminated[0]))
    assert not torch.equal(batch_out[5][0][0], batch_out[5][0][1]), "different seeds dream differently"


def test_dream_env_refuses_a_world_model_of_another_vae(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    vae = ConvVAE(ConvVAEConfig(latent_dim=4, channels=(8, 8, 8, 8)))  # a different VAE in its place
    save_checkpoint(ckpt / "vae.pt", {"config": {"latent_dim": 4, "channels": [8, 8, 8, 8], "kl_tolerance": 0.5},
                                      "state_dict": vae.state_dict()})
    with pytest.raises(UserError, match="trained on another VAE"):
        load_vae_and_world_model(ckpt)


def test_latent_cache_is_reused_and_invalidated(tmp_path):
    data = tmp_path / "data"
    paths = [episode_path(data, "random", s) for s in range(2)]
    for seed, path in enumerate(paths):
        save_episode(path, make_episode(12, seed))
    vae = ConvVAE(ConvVAEConfig(latent_dim=4, channels=(8, 8, 8, 8))).eval()
    cache = encode_episodes(vae, "a" * 64, paths, data, progress=False)
    assert set(cache) == set(paths) and all(c == latent_cache_path(data, "a" * 64, p) for p, c in cache.items())
    mtimes = {p: c.stat().st_mtime_ns for p, c in cache.items()}
    again = encode_episodes(vae, "a" * 64, paths, data, progress=False)
    assert {p: c.stat().st_mtime_ns for p, c in again.items()} == mtimes, "a valid cache is reused"
    other = encode_episodes(vae, "b" * 64, paths, data, progress=False)
    assert all(c.parent.parent.name == "b" * 16 for c in other.values()), "another VAE gets its own cache"
    damaged = cache[paths[0]]
    damaged.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="skipping latent file"):
        assert load_latent_episode(damaged, "a" * 64) is None
    rebuilt = encode_episodes(vae, "a" * 64, paths, data, progress=False)
    assert load_latent_episode(rebuilt[paths[0]], "a" * 64) is not None, "a damaged cache file is rebuilt"
    assert rebuilt[paths[1]].stat().st_mtime_ns == mtimes[paths[1]]
    with pytest.warns(UserWarning, match="another VAE"):  # a file claiming another VAE is never used
        assert load_latent_episode(rebuilt[paths[1]], "c" * 64) is None


def test_train_world_model_stage_resumes_and_errors(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    (ckpt / "world_model.pt").unlink()
    data = tmp_path / "data"
    for seed in range(3):
        episode = make_episode(30, seed)
        if seed == 0:
            episode["terminated"][-1], episode["truncated"][-1] = True, False
        save_episode(episode_path(data, "random", seed), episode)
    common = ["train_world_model.py", "--data-dir", str(data), "--ckpt-dir", str(ckpt), "--log-dir",
              str(tmp_path / "runs"), *smoke.TINY["train_world_model"], "--no-collect",
              "--action-repeat", "1"]  # make_episode's files, like those collected before the clock, say 1
    first = run_script(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert (ckpt / "world_model.pt").exists() and (ckpt / "world_model_grid.png").exists()
    second = run_script(*common, "--epochs", "2")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "epoch 2:" in second.stdout and "epoch 1:" not in second.stdout
    _, model, checkpoint = load_vae_and_world_model(ckpt)
    metrics = checkpoint["metrics"]
    assert all(math.isfinite(metrics[k]) for k in ("val_z_nll", "val_z_mse", "val_reward_mae"))
    assert checkpoint["start_bank"]["mu"].shape[1] == 4
    save_episode(episode_path(data, "agent", 9), make_episode(30, 9))  # new on-policy data arrives
    third = run_script(*common, "--epochs", "3")
    assert third.returncode == 0, third.stderr
    assert "data set changed" in third.stdout and "epoch 3:" in third.stdout and "saved" in third.stdout
    env = gym.make("DreamCarRacing-v0", ckpt_dir=str(ckpt))  # the checkpoint dir alone is enough to dream
    assert env.reset(seed=0)[0].shape == (4 + 16,)
    missing = run_script("train_world_model.py", "--ckpt-dir", str(tmp_path / "nowhere"), "--data-dir", str(data))
    assert missing.returncode == 2 and "run train_vae.py" in missing.stderr and "Traceback" not in missing.stderr


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    data = tmp_path / "data"
    for seed in range(4):
        save_episode(episode_path(data, "random", seed), make_episode(30, seed))
    common = ["train_world_model.py", "--data-dir", str(data), "--ckpt-dir", str(ckpt), "--log-dir",
              str(tmp_path / "runs"), "--hidden-dim", "16", "--num-mixtures", "2", "--batch-size", "1", "--no-collect",
              "--action-repeat", "1"]
    assert run_script(*common, "--epochs", "1").returncode == 0
    good = (ckpt / "world_model_latest.pt").read_bytes()
    blown = run_script(*common, "--epochs", "3", "--fresh", "--lr", "1e30")  # diverges within a step or two
    assert blown.returncode == 2 and "Traceback" not in blown.stderr
    assert "loss became" in blown.stderr and "step" in blown.stderr and "last good checkpoint" in blown.stderr
    assert (ckpt / "world_model_latest.pt").read_bytes() == good


def test_a_world_model_of_the_mean_latent_learns_from_mu_and_dreams_from_mu(tmp_path):
    import train_world_model
    from utils import resume_checkpoint, stage_checkpoint

    torch.manual_seed(0)
    batch = {"mu": torch.randn(2, 6, 4), "logvar": torch.zeros(2, 6, 4), "action": torch.rand(2, 6, 3),
             "reward": torch.randn(2, 5), "terminated": torch.zeros(2, 5), "step_mask": torch.ones(2, 5),
             "z_mask": torch.ones(2, 5)}
    args = train_world_model.Args()
    losses = {}
    for latent in ("sample", "mean"):
        torch.manual_seed(1)
        model = build_world_model(WorldModelConfig(arch="mdn", latent=latent, **TINY))
        losses[latent] = [train_world_model.model_loss(model, batch, args)[1]["loss"].item() for _ in range(2)]
        exact = train_world_model.model_loss(model, batch, args, sample=False)[1]["loss"].item()
    assert losses["sample"][0] != losses["sample"][1], "a sampling model draws a new z per batch"
    assert losses["mean"][0] == losses["mean"][1] == exact, "a mean model learns from mu itself"

    bank = {"mu": torch.randn(3, 4), "logvar": torch.zeros(3, 4)}  # posterior std 1: a sampled start is far from mu
    for latent in ("sample", "mean"):
        model = build_world_model(WorldModelConfig(latent=latent, **TINY))
        batched = BatchedDream(model, bank["mu"], bank["logvar"], 8)
        starts = batched.reset(torch.arange(8))[:, :4]
        from_bank = (starts[:, None] == bank["mu"][None]).all(-1).any(-1)
        assert from_bank.all() if latent == "mean" else not from_bank.any()

    # a checkpoint made before the field existed resumes as a sampling model (the field's default)
    model, config = build_world_model(WorldModelConfig(**TINY)), WorldModelConfig(**TINY)
    optimizer = torch.optim.Adam(model.parameters())
    old = stage_checkpoint(config, model, args, tmp_path, epoch=1, best_val_loss=0.0, optimizer=optimizer.state_dict())
    del old["config"]["latent"]
    save_checkpoint(tmp_path / "latest.pt", old)
    assert resume_checkpoint(tmp_path / "latest.pt", tmp_path / "best.pt", args, config, model, optimizer, "cpu", "")
    with pytest.raises(UserError, match="use the same settings"):
        resume_checkpoint(tmp_path / "latest.pt", tmp_path / "best.pt", args, WorldModelConfig(latent="mean", **TINY),
                          model, optimizer, "cpu", "")


def test_critical_weight_weighs_the_decisions_around_a_loss_of_the_road_in_the_loss():
    import train_world_model
    from dream import critical_states

    reward = np.full(60, 30.0, np.float32)
    reward[40:] = -0.4  # the road is lost at decision 40: decisions 20-49 are critical
    episode = {"mu": np.zeros((60, 4), np.float32), "logvar": np.zeros((60, 4), np.float32),
               "action": np.zeros((60, 3), np.float32), "reward": reward, "terminated": np.zeros(60, bool)}
    episode["weight"] = np.where(critical_states(reward), 4.0, 1.0).astype(np.float32)
    batch = train_world_model.make_batch([episode], 60, np.random.default_rng(0), "cpu")
    expected = torch.ones(60)
    expected[20:50] = 4
    torch.testing.assert_close(batch["step_mask"][0], expected)
    expected[-1] = 0  # the last decision has no next frame
    torch.testing.assert_close(batch["z_mask"][0], expected)
    del episode["weight"]  # validation episodes are unweighted
    assert set(train_world_model.make_batch([episode], 60, np.random.default_rng(0), "cpu")["step_mask"][0].tolist()) \
        == {1.0}
