"""The Ray backend on a real cluster: a head and a second node started on this machine (two raylets, one CPU
each), torn down after. The same seeds give the same episodes, evaluation and CMA-ES fitness as one machine,
both nodes take tasks, a node killed mid-collection costs nothing, and bad addresses are one line."""

import time

import numpy as np
import pytest
import torch

import cluster
import smoke
from conftest import make_checkpoint_dir, make_episode, run_script, save_linear_controller
from episodes import EPISODE_KEYS, episode_path, list_episodes, load_episode, save_episode
from rollouts import collect_episodes, evaluate_agent, play_episodes
from utils import UserError, load_checkpoint

ray_cluster_utils = pytest.importorskip("ray.cluster_utils", reason="the cluster tests need requirements-cluster.txt")

SEEDS = range(7)
MAX_STEPS = 80  # frames: 20 decisions of the random policy


@pytest.fixture(scope="module")
def two_nodes():
    """A head and a second node, one CPU each; yields (cluster, second node). Torn down after the module."""
    head = ray_cluster_utils.Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    second = head.add_node(num_cpus=1)
    head.wait_for_nodes()
    try:
        yield head, second
    finally:
        cluster.disconnect()
        head.shutdown()


def episodes_of(data_dir, seeds) -> dict:
    keys = (*EPISODE_KEYS, "action_repeat")
    return {seed: load_episode(episode_path(data_dir, "random", seed), keys) for seed in seeds}


def assert_same_episodes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for seed in a:
        for key in ("obs", "action", "reward", "terminated", "truncated", "seed", "action_repeat"):
            np.testing.assert_array_equal(a[seed][key], b[seed][key], err_msg=f"track {seed}: {key}")


def test_cluster_collection_matches_one_machine_and_survives_a_dying_node(two_nodes, tmp_path):
    head, second = two_nodes
    local = tmp_path / "local"
    collect_episodes(local, SEEDS, MAX_STEPS, workers=1, progress=False)

    # both nodes take episodes; the files are those one machine writes
    on_ray = tmp_path / "ray"
    summaries = collect_episodes(on_ray, SEEDS[:4], MAX_STEPS, progress=False, ray_address=head.address)
    assert len({s["node"] for s in summaries}) == 2, "both nodes should have run episodes"
    # a re-run skips the finished episodes
    assert collect_episodes(on_ray, SEEDS[:4], MAX_STEPS, progress=False, ray_address=head.address) == []

    # the second node dies once the first of the rest has come back: its tasks run again on the head
    killed = []

    def kill_second_node(done: list) -> None:
        if not killed:
            head.remove_node(second, allow_graceful=False)
            killed.append(time.perf_counter())

    tasks = [(seed, str(episode_path(on_ray, "random", seed))) for seed in SEEDS[4:]]
    rest = play_episodes(tasks, MAX_STEPS, progress=False, on_result=kill_second_node, ray_address=head.address,
                         policy_kwargs={"action_repeat": 4})
    assert killed and sorted(s["seed"] for s in rest) == list(SEEDS[4:]), "every episode comes back exactly once"
    assert len(list_episodes(on_ray)) == len(SEEDS)
    assert not list((on_ray / "rollouts" / "random").glob(".*")), "no temporary file is left"
    assert_same_episodes(episodes_of(on_ray, SEEDS), episodes_of(local, SEEDS))
    head.add_node(num_cpus=1)  # two nodes again for the tests that follow
    head.wait_for_nodes()


def test_cluster_evaluation_and_cmaes_fitness_match_one_machine(two_nodes, tmp_path):
    from actor_critic import LinearController
    from dream import BatchedDream, dream_fitness, population_fitness_on_cluster

    head, _ = two_nodes
    ckpt = make_checkpoint_dir(tmp_path)
    save_linear_controller(ckpt)
    local = evaluate_agent(ckpt, "cmaes", episodes=4, seed=7, workers=1, max_steps=60, progress=False)
    on_ray = evaluate_agent(ckpt, "cmaes", episodes=4, seed=7, max_steps=60, progress=False, ray_address=head.address)
    assert on_ray["returns"] == local["returns"] and on_ray["frames"] == local["frames"]

    from agent import load_world_model

    world_model, checkpoint = load_world_model(ckpt / "world_model.pt")
    popsize, rollouts = 6, 3
    solutions = torch.randn(popsize, LinearController.num_params(world_model.controller_input_dim)) * 0.5
    seeds = torch.arange(rollouts) + 100
    bank = checkpoint["start_bank"]
    dream = BatchedDream(world_model, bank["mu"], bank["logvar"], popsize * rollouts, 1.0, 80)
    expected = dream_fitness(dream, solutions, rollouts, seeds.repeat(popsize)).numpy()
    fitness = population_fitness_on_cluster(head.address, ckpt / "world_model.pt", solutions.numpy(), rollouts, seeds,
                                            1.0, 80)
    np.testing.assert_allclose(fitness, expected, rtol=1e-5, atol=1e-4)

    # two evolutions' populations of 3 in one call (--evolutions 2), each on its own seeds: as each alone
    seeds_of_groups = torch.arange(2 * rollouts) + 200
    half = BatchedDream(world_model, bank["mu"], bank["logvar"], popsize // 2 * rollouts, 1.0, 80)
    expected = np.concatenate([dream_fitness(half, solutions[g * 3:(g + 1) * 3], rollouts,
                                             seeds_of_groups[g * rollouts:(g + 1) * rollouts].repeat(3)).numpy()
                               for g in range(2)])
    fitness = population_fitness_on_cluster(head.address, ckpt / "world_model.pt", solutions.numpy(), rollouts,
                                            seeds_of_groups, 1.0, 80, groups=2)
    np.testing.assert_allclose(fitness, expected, rtol=1e-5, atol=1e-4)


def test_cmaes_evolutions_on_the_cluster_evolve_what_one_machine_does(two_nodes, tmp_path):
    """train_cmaes_in_dream.py --evolutions 2 from replayed starts, its populations dreamt on the two nodes in one
    call a generation: the same controller as the run on this machine."""
    from agent import controller_path

    head, _ = two_nodes
    for seed in range(2):  # real episodes whose states start the dreams
        save_episode(episode_path(tmp_path / "data", "random", seed), make_episode(12, seed))
    controllers = []
    for where, extra in (("local", []), ("ray", ["--ray-address", head.address])):
        ckpt = make_checkpoint_dir(tmp_path / where)
        result = run_script("train_cmaes_in_dream.py", "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
                            "--data-dir", str(tmp_path / "data"), *smoke.TINY["train_cmaes_in_dream"],
                            "--evolutions", "2", *extra)
        assert result.returncode == 0, result.stderr
        controllers.append(load_checkpoint(controller_path(ckpt, "cmaes"))["state_dict"])
    for name in controllers[0]:
        torch.testing.assert_close(controllers[1][name], controllers[0][name], rtol=1e-5, atol=1e-5)


def test_a_cluster_that_cannot_run_the_project_is_one_line(two_nodes, tmp_path, monkeypatch):
    head, _ = two_nodes
    cluster.disconnect()
    with pytest.raises(UserError, match="2 nodes .* cannot import no_such_package"):
        cluster.connect(head.address, modules=("numpy", "no_such_package"))
    with monkeypatch.context() as patch:  # as if this machine had another numpy than the nodes
        patch.setattr(cluster, "_versions", lambda: {name: "0.0" for name in cluster.PINNED})
        with pytest.raises(UserError, match="has numpy .*, this machine 0.0"):
            cluster.connect(head.address)
    ckpt = make_checkpoint_dir(tmp_path)
    save_linear_controller(ckpt)
    with pytest.raises(UserError, match="nodes' CPUs"):
        evaluate_agent(ckpt, "cmaes", episodes=1, progress=False, ray_address=head.address, device="cuda")


def test_an_unreachable_cluster_is_one_line(tmp_path):
    start = time.perf_counter()
    with pytest.raises(UserError, match="no Ray cluster answers at 127.0.0.1:9"):
        cluster.connect("127.0.0.1:9")
    with pytest.raises(UserError, match="HOST:PORT"):
        cluster.connect("not-an-address")
    assert time.perf_counter() - start < 30
    result = run_script("collect_data.py", "--data-dir", str(tmp_path), "--ray-address", "127.0.0.1:9",
                        "--episodes", "1")
    assert result.returncode != 0 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "no Ray cluster answers" in result.stderr
