"""An ensemble agent (make_ensemble.py): members on one VAE, the mean of their actions, every h remembering it."""

import shutil

import numpy as np
import pytest
import torch

import cluster
import make_ensemble
from actor_critic import LinearController
from agent import agent_dir_and_controller, agent_files_of, load_agent
from conftest import TINY_WORLD_MODEL, make_checkpoint_dir, run_script, save_actor_critic, save_linear_controller
from rollouts import evaluate_agent
from utils import UserError, checkpoint_identity, plain, save_checkpoint
from world_model import WorldModelConfig, build_world_model


def make_member(base, directory, seed: int):
    """Another member on BASE's VAE: its own random world model and linear controller, in DIRECTORY."""
    directory.mkdir()
    shutil.copy(base / "vae.pt", directory / "vae.pt")
    torch.manual_seed(seed)
    model = build_world_model(WorldModelConfig(arch="gru", action_repeat=1, **TINY_WORLD_MODEL))
    save_checkpoint(directory / "world_model.pt", {
        "config": plain(model.config), "state_dict": model.state_dict(),
        "vae": checkpoint_identity(directory / "vae.pt"),
        "start_bank": {"mu": torch.randn(5, 4), "logvar": torch.full((5, 4), -2.0)}})
    save_linear_controller(directory, seed)
    return directory


@pytest.fixture
def members(tmp_path):
    base = make_checkpoint_dir(tmp_path)
    save_linear_controller(base, 0)
    return [base, make_member(base, tmp_path / "b", 1), make_member(base, tmp_path / "c", 2)]


def test_ensemble_acts_as_the_mean_of_its_members(tmp_path, members):
    out = tmp_path / "ensemble"
    make_ensemble.main(make_ensemble.Args(members=members, out_dir=out, controller=["cmaes"]))
    assert agent_dir_and_controller(out, None) == (out, "ensemble"), "the ensemble is the dir's default"
    ensemble = load_agent(out, "ensemble")
    singles = [load_agent(member, "cmaes") for member in members]
    assert len(ensemble.members) == 3
    frames = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        for frame in frames:
            actions = [single.controller(single.features.observe(frame[None])) for single in singles]
            expected = torch.stack(actions).mean(0)
            for single in singles:  # every member's h steps on the action the ensemble took
                single.features.remember(expected)
            np.testing.assert_allclose(ensemble.act(frame), expected[0].numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(actions[0], actions[1]), "the members differ, so the mean is a test"

    # a cluster node gets every member's file under its relative name, and loads the same agent from them
    names = cluster.ship_files(agent_files_of(out, "ensemble"), root=out)
    assert {"member1/world_model.pt", "member2/controller_cmaes.pt", "controller_ensemble.pt"} <= set(names)
    copy = cluster.local_copy(names)
    assert load_agent(copy, "ensemble").act(frames[0]) == pytest.approx(load_agent(out, "ensemble").act(frames[0]))

    result = evaluate_agent(out, "ensemble", episodes=1, workers=1, max_steps=20, progress=False)
    assert result["controller"] == "ensemble" and len(result["returns"]) == 1


def test_weighted_ensemble_acts_as_the_weighted_mean(tmp_path, members):
    """--weights 3 1 1: the action is (3 a0 + a1 + a2) / 5; an ensemble file without weights weighs members equally."""
    out = tmp_path / "weighted"
    for bad in ([1.0, 2.0], [1.0, 0.0, 1.0]):
        with pytest.raises(UserError, match="one positive weight per member"):
            make_ensemble.main(make_ensemble.Args(members=members, out_dir=out, controller=["cmaes"], weights=bad))
    make_ensemble.main(make_ensemble.Args(members=members, out_dir=out, controller=["cmaes"], weights=[3.0, 1.0, 1.0]))
    ensemble, singles = load_agent(out, "ensemble"), [load_agent(member, "cmaes") for member in members]
    frames = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        for frame in frames:
            actions = torch.stack([single.controller(single.features.observe(frame[None])) for single in singles])
            expected = (3 * actions[0] + actions[1] + actions[2]) / 5
            assert not torch.allclose(expected, actions.mean(0)), "the weights change the action"
            for single in singles:
                single.features.remember(expected)
            np.testing.assert_allclose(ensemble.act(frame), expected[0].numpy(), rtol=1e-5, atol=1e-6)

    checkpoint = torch.load(out / "controller_ensemble.pt", weights_only=True)
    unweighted = [{k: v for k, v in m.items() if k != "weight"} for m in checkpoint["config"]["members"]]
    save_checkpoint(out / "controller_ensemble.pt", checkpoint | {"config": {"members": unweighted}})
    assert load_agent(out, "ensemble").weights.flatten().tolist() == pytest.approx([1 / 3] * 3)
    save_checkpoint(out / "controller_ensemble.pt", checkpoint | {
        "config": {"members": [checkpoint["config"]["members"][0] | {"weight": -1.0}]}})
    with pytest.raises(UserError, match="is not an ensemble checkpoint"):
        load_agent(out, "ensemble")


def test_ensemble_of_controllers_of_different_kinds(tmp_path, members):
    """A real-env PPO controller beside dream-trained ones: each member plays its own kind, one action shared."""
    save_actor_critic(members[1], "ppo", seed=5)
    out = tmp_path / "mixed"
    with pytest.raises(UserError, match="one name for all, or one per member"):
        make_ensemble.main(make_ensemble.Args(members=members, out_dir=out, controller=["cmaes", "ppo"]))
    make_ensemble.main(make_ensemble.Args(members=members, out_dir=out, controller=["cmaes", "ppo", "cmaes"]))
    assert (out / "member1" / "controller_ppo.pt").is_file() and not (out / "member1" / "controller_cmaes.pt").exists()
    # a member dir inside OUT_DIR (an agent shipped beside it) is named where it is, not copied
    inner = shutil.copytree(members[2], members[0] / "dream")
    make_ensemble.main(make_ensemble.Args(members=[members[0], members[1], inner], out_dir=members[0],
                                          controller=["cmaes", "ppo", "cmaes"]))
    assert not (members[0] / "member2").exists()
    assert load_agent(members[0], "ensemble").act(np.zeros((64, 64, 3), np.uint8)) == pytest.approx(
        load_agent(out, "ensemble").act(np.zeros((64, 64, 3), np.uint8)))
    assert members[0] / "dream" / "controller_cmaes.pt" in agent_files_of(members[0], "ensemble")
    ensemble = load_agent(out, "ensemble")
    singles = [load_agent(member, name) for member, name in zip(members, ["cmaes", "ppo", "cmaes"])]
    frame = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        expected = torch.stack([single.controller(single.features.observe(frame[None])) for single in singles]).mean(0)
    np.testing.assert_allclose(ensemble.act(frame), expected[0].numpy(), rtol=1e-5, atol=1e-6)


def test_ensemble_refuses_mismatched_or_changed_members(tmp_path, members):
    out = tmp_path / "ensemble"
    with pytest.raises(UserError, match="two or more"):
        make_ensemble.main(make_ensemble.Args(members=members[:1], out_dir=out, controller=["cmaes"]))
    with pytest.raises(UserError, match="is a member other than the first"):
        make_ensemble.main(make_ensemble.Args(members=members, out_dir=members[1], controller=["cmaes"]))
    other = make_checkpoint_dir(tmp_path / "other")  # a member trained on another VAE
    vae = torch.load(other / "vae.pt", weights_only=True)
    vae["state_dict"] = {key: value + 1 for key, value in vae["state_dict"].items()}
    save_checkpoint(other / "vae.pt", vae)
    save_linear_controller(other, 3)
    with pytest.raises(UserError, match="another vae"):
        make_ensemble.main(make_ensemble.Args(members=[members[0], other], out_dir=out, controller=["cmaes"]))

    make_ensemble.main(make_ensemble.Args(members=members, out_dir=out, controller=["cmaes"]))
    checkpoint = torch.load(out / "controller_ensemble.pt", weights_only=True)
    for damage in ({"sha256": 5}, {"sha256": []}, {"world_model": 3}, {"controller": None}):
        save_checkpoint(out / "controller_ensemble.pt", checkpoint | {
            "config": {"members": [checkpoint["config"]["members"][0] | damage]}})
        with pytest.raises(UserError, match="is not an ensemble checkpoint"):
            load_agent(out, "ensemble")

    make_ensemble.main(make_ensemble.Args(members=members, out_dir=members[0], controller=["cmaes"]))  # in place
    assert load_agent(members[0], "ensemble").members[0][0].world_model is not None
    # a member replaced after the ensemble was made
    shutil.copy(members[0] / "member1" / "controller_cmaes.pt", members[0] / "member2" / "controller_cmaes.pt")
    with pytest.raises(UserError, match="has changed since"):
        load_agent(members[0], "ensemble")
    result = run_script("evaluate.py", "--ckpt-dir", str(members[0]), "--episodes", "1", "--max-steps", "5",
                        "--workers", "1")
    assert result.returncode == 2 and "has changed since" in result.stderr and "Traceback" not in result.stderr


def test_play_only_copies_drop_the_critic_and_act_the_same(tmp_path, members):
    for seed, member in enumerate(members):
        save_actor_critic(member, seed=seed)
    whole, lean = tmp_path / "whole", tmp_path / "lean"
    make_ensemble.main(make_ensemble.Args(members=members, out_dir=whole))
    make_ensemble.main(make_ensemble.Args(members=members, out_dir=lean, drop_critic=True))
    for name in ("controller_ppo_dream.pt", "member2/controller_ppo_dream.pt"):
        state = torch.load(lean / name, weights_only=True)["state_dict"]
        assert state and not any(key.startswith("critic.") for key in state)
        assert (lean / name).stat().st_size < (whole / name).stat().st_size
    frames = np.random.default_rng(1).integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    agents = [load_agent(d, "ensemble") for d in (whole, lean)]
    for frame in frames:
        np.testing.assert_array_equal(agents[0].act(frame), agents[1].act(frame))
    with pytest.raises(UserError, match="holds no member"):
        make_ensemble.main(make_ensemble.Args(members=members, out_dir=members[0], drop_critic=True))
    # only a copy marked play-only may lack the critic, and nothing else
    checkpoint = torch.load(lean / "controller_ppo_dream.pt", weights_only=True)
    for damaged in ({k: v for k, v in checkpoint.items() if k != "play_only"},
                    checkpoint | {"state_dict": {k: v for k, v in checkpoint["state_dict"].items()
                                                 if k != "actor.0.weight"}}):
        save_checkpoint(lean / "controller_ppo_dream.pt", damaged)
        with pytest.raises(UserError, match="not a controller checkpoint"):
            load_agent(lean, "ppo_dream")


def test_shipped_agents_load_and_fit_the_size_limit():
    """pretrained/ is `make train`'s output: it plays the mean of its real-env PPO controller and the dream-trained one
    of the same run's `make dream` (pretrained/dream/, on the same VAE through a link, which also holds the linear
    controller CMA-ES evolved in that dream, `make dream-cmaes`); every member is intact, and pretrained/ stays within
    its 45 MB."""
    from agent import PRETRAINED_DIR

    assert agent_dir_and_controller(None, None) == (PRETRAINED_DIR, "ensemble")
    files = agent_files_of(PRETRAINED_DIR, "ensemble")
    assert {PRETRAINED_DIR / "controller_ppo.pt", PRETRAINED_DIR / "dream" / "controller_ppo_dream.pt"} <= set(files)
    assert len(load_agent(PRETRAINED_DIR, "ensemble").members) == 2
    assert agent_dir_and_controller(PRETRAINED_DIR / "dream", None) == (PRETRAINED_DIR / "dream", "ppo_dream")
    dream_agent = load_agent(PRETRAINED_DIR / "dream", "ppo_dream")
    assert dream_agent.action_repeat == 4
    # one VAE for both: the dream dir's vae.pt is a link to pretrained/vae.pt, not a second 17 MB copy
    assert (PRETRAINED_DIR / "dream" / "vae.pt").is_symlink()
    assert (PRETRAINED_DIR / "dream" / "vae.pt").resolve() == (PRETRAINED_DIR / "vae.pt").resolve()
    linear = load_agent(PRETRAINED_DIR / "dream", "cmaes")  # (checked against the dream dir's VAE and world model)
    assert linear.action_repeat == 4 and isinstance(linear.controller, LinearController)
    stored = [path.lstat().st_size for path in PRETRAINED_DIR.rglob("*") if path.is_file() and not path.is_symlink()]
    assert sum(stored) <= 45_000_000
