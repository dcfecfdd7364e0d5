import json
import shutil
from pathlib import Path

import cma
import numpy as np
import pytest
import torch

import smoke
from actor_critic import ControllerConfig, DreamCritic, LinearController, population_actions, squash
from agent import controller_path, load_agent, load_controller, load_vae_and_world_model
from conftest import make_checkpoint_dir, make_episode, run_script, save_actor_critic, save_linear_controller
from dream import BatchedDream, ReplayStarts, dream_fitness, load_replay
from episodes import episode_path, save_episode
from train_cmaes_in_dream import Args as CMAESArgs
from train_cmaes_in_dream import distill_linear, es_state, generation_starts, load_dream_value, new_es, restore_es
from utils import UserError, load_checkpoint, save_checkpoint
from utils_rl import fit_critic
from world_model import WorldModelConfig, build_world_model


def test_squash_maps_onto_the_action_box():
    actions = squash(torch.randn(1000, 3) * 5)
    assert actions[:, 0].min() >= -1 and actions[:, 0].max() <= 1
    assert actions[:, 1:].min() >= 0 and actions[:, 1:].max() <= 1
    assert (actions[:, 2] == 0).float().mean() > 0.3  # half of the brake's range means no brake


def test_population_pass_equals_each_controller_alone():
    torch.manual_seed(0)
    config = ControllerConfig(obs_dim=6)
    flat = torch.randn(5, LinearController.num_params(6))
    obs = torch.randn(5, 7, 6)
    together = population_actions(flat, obs)
    for p in range(5):
        controller = LinearController(config)
        controller.set_flat(flat[p])
        torch.testing.assert_close(controller(obs[p]), together[p])


def gas_pays_world_model():
    """A tiny GRU world model wired by hand so the dream's reward is tanh(gas) at every step."""
    model = build_world_model(WorldModelConfig(arch="gru", latent_dim=4, hidden_dim=16))
    hidden = 16
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.rnn.bias_ih_l0[hidden:2 * hidden] = -20.0  # update gate shut: h = candidate
        model.rnn.weight_ih_l0[2 * hidden, 4 + 1] = 1.0  # candidate h_0 = tanh(gas)
        model.head.weight[-2, 0] = 1.0  # reward = h_0
        model.head.bias[-1] = -20.0  # never done
    return model.eval()


def test_cmaes_in_a_tiny_dream_learns_to_press_the_gas():
    model = gas_pays_world_model()
    popsize, rollouts = 8, 2
    dream = BatchedDream(model, torch.zeros(3, 4), torch.full((3, 4), -2.0), popsize * rollouts, max_steps=20)
    es = cma.CMAEvolutionStrategy(np.zeros(LinearController.num_params(20)), 0.5,
                                  {"popsize": popsize, "seed": 1, "verbose": -9})
    seeds = torch.arange(rollouts).repeat(popsize)
    means = []
    for _ in range(6):
        solutions = np.array(es.ask())
        fitness = dream_fitness(dream, torch.as_tensor(solutions, dtype=torch.float32), rollouts, seeds).numpy()
        es.tell(list(solutions), list(-fitness))
        means.append(fitness.mean())
    assert means[-1] > means[0] + 1.0 and means[-1] > 10  # at most 20 x tanh(1) = 15.2


def test_dream_fitness_gives_equal_candidates_equal_scores():
    model = build_world_model(WorldModelConfig(arch="gru", latent_dim=4, hidden_dim=16)).eval()
    dream = BatchedDream(model, torch.randn(3, 4), torch.full((3, 4), -2.0), 3 * 4, max_steps=15)
    solution = torch.randn(LinearController.num_params(20))
    fitness = dream_fitness(dream, solution.expand(3, -1).contiguous(), 4, torch.arange(4).repeat(3))
    assert fitness[0] == fitness[1] == fitness[2], "common random numbers: the same seeds, the same luck"


class ConstantCritic(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return torch.full(obs.shape[:1], self.value)


def test_a_critic_pays_a_cut_dream_the_discounted_value_where_it_ends():
    """--critic: the fitness of a dream cut after 7 decisions is the discounted return plus gamma**7 V(the end);
    a dream that terminated before the cut gets no value."""
    model = gas_pays_world_model()
    dream = BatchedDream(model, torch.zeros(3, 4), torch.full((3, 4), -2.0), 2 * 3, max_steps=7)  # 7 decisions
    full_gas = torch.cat([torch.zeros(3, 20).flatten(), torch.tensor([0.0, 10.0, -10.0])])
    gamma, reward = 0.9, float(np.tanh(1.0))
    fitness = dream_fitness(dream, full_gas.expand(2, -1).contiguous(), 3, torch.arange(3).repeat(2), gamma=gamma,
                            critic=ConstantCritic(5.0))
    expected = reward * (1 - gamma ** 7) / (1 - gamma) + gamma ** 7 * 5.0
    assert torch.allclose(fitness, torch.full((2,), expected), atol=1e-4)
    with torch.no_grad():
        model.head.bias[-1] = 20.0  # every dream ends (terminated) at its first decision
    fitness = dream_fitness(dream, full_gas[None], 6, torch.arange(6), gamma=gamma, critic=ConstantCritic(5.0))
    assert torch.allclose(fitness, torch.full((1,), reward), atol=1e-4)


def test_fit_critic_learns_the_value_beyond_the_cut():
    """Fitted again and again on 7-decision dreams that each earn tanh(1) a decision and are then cut, the critic
    bootstraps itself to the value of the endless stream, tanh(1) / (1 - gamma), not the 7 decisions' return."""
    torch.manual_seed(0)
    model = gas_pays_world_model()
    dream = BatchedDream(model, torch.randn(8, 4), torch.full((8, 4), -2.0), 64, max_steps=7)
    full_gas = torch.cat([torch.zeros(3, 20).flatten(), torch.tensor([0.0, 10.0, -10.0])])
    gamma = 0.8  # 7 decisions earn 79% of the stream from the first, less from the later ones
    critic = DreamCritic(20, hidden_dim=32)
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for generation in range(60):
        trajectory = {}
        dream_fitness(dream, full_gas[None], 64, torch.arange(64) + 64 * generation, gamma=gamma, critic=critic,
                      trajectory=trajectory)
        assert trajectory["obs"].shape == (8, 64, 20) and trajectory["reward"].shape == (7, 64)
        fit_critic(critic, optimizer, trajectory, gamma, 0.95, generator, epochs=2, batch_size=64)
    with torch.no_grad():
        values = critic(trajectory["obs"][:-1].flatten(0, 1))
    target = float(np.tanh(1.0)) / (1 - gamma)
    assert abs(values.mean().item() - target) < 0.1, (values.mean().item(), target)


def test_cmaes_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    """A resumed evolution asks exactly what the uninterrupted one asks: the state is plain numbers and tensors
    (no pickle), restored into a fresh ES, numpy's generator included."""
    args = CMAESArgs(popsize=6, sigma0=0.1, seed=3)

    def generation(es):
        candidates = es.ask()
        es.tell(candidates, [float(np.sum((np.asarray(x) - 1) ** 2) + np.sin(np.sum(x))) for x in candidates])

    size = 3 * 288 + 3  # the linear controller on [z, h] of the shipped sizes: cma's lazy updates included
    uninterrupted = new_es(size, args)
    for _ in range(6):
        generation(uninterrupted)
    interrupted = new_es(size, args)
    for _ in range(3):
        generation(interrupted)
    save_checkpoint(tmp_path / "es.pt", {"config": {}, "state_dict": {}, "es_state": es_state(interrupted)})
    np.random.seed(12345)  # another process: numpy's generator is elsewhere
    resumed = restore_es(new_es(size, args), load_checkpoint(tmp_path / "es.pt")["es_state"])  # weights_only
    for _ in range(3):
        generation(resumed)
    assert resumed.countiter == uninterrupted.countiter == 6
    np.testing.assert_array_equal(resumed.mean, uninterrupted.mean)
    assert resumed.sigma == uninterrupted.sigma


def test_cmaes_stage_checkpoints_and_resumes(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    for seed in range(2):  # real episodes whose states start the dreams (--replay, the default)
        save_episode(episode_path(tmp_path / "data", "random", seed), make_episode(12, seed))
    common = ["train_cmaes_in_dream.py", "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), *smoke.TINY["train_cmaes_in_dream"]]
    first = run_script(*common, "--generations", "1")
    assert first.returncode == 0, first.stderr
    assert "dreams from 24 replayed real states of 2 episodes" in first.stdout
    second = run_script(*common, "--generations", "2")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout
    other = run_script(*common, "--generations", "3", "--popsize", "6")
    assert other.returncode == 2 and "other popsize (popsize=4)" in other.stderr, other.stderr
    checkpoint = load_checkpoint(controller_path(ckpt, "cmaes"))
    assert checkpoint["generation"] == 2 and checkpoint["world_model"]["sha256"] and "es" not in checkpoint
    agent = load_agent(ckpt, "cmaes")
    action = agent(np.zeros((64, 64, 3), np.uint8))
    assert action.shape == (3,) and -1 <= action[0] <= 1 and 0 <= action[1] <= 1
    world_model = load_checkpoint(ckpt / "world_model.pt")  # an on-policy round retrained the world model
    world_model["state_dict"] = {k: v * 0.5 for k, v in world_model["state_dict"].items()}
    save_checkpoint(ckpt / "world_model.pt", world_model)
    third = run_script(*common, "--generations", "3")
    assert third.returncode == 0, third.stderr
    assert "starting over in the current one" in third.stdout and "resuming" not in third.stdout
    assert load_checkpoint(controller_path(ckpt, "cmaes"))["generation"] == 3
    with_critic = run_script(*common, "--generations", "4", "--critic")  # what the fitness is: one clear line
    assert with_critic.returncode == 2 and "other critic (critic=False)" in with_critic.stderr, with_critic.stderr


def test_cmaes_with_a_critic_checkpoints_and_resumes_it(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    save_episode(episode_path(tmp_path / "data", "random", 0), make_episode(12, 0))
    common = ["train_cmaes_in_dream.py", "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), *smoke.TINY["train_cmaes_in_dream"], "--critic"]
    for generations in ("1", "2"):
        result = run_script(*common, "--generations", generations)
        assert result.returncode == 0, result.stderr
    assert "resuming from" in result.stdout
    latest = load_checkpoint(ckpt / "cmaes_latest.pt")
    assert latest["generation"] == 2 and latest["metrics"]["critic_loss"] >= 0
    assert set(latest["critic"]) >= {"obs_norm.count", "net.0.weight"} and latest["critic_optimizer"]["state"]
    assert latest["critic"]["obs_norm.count"] > 12, "two generations of dreams went into the critic's statistics"


def test_value_from_pays_cut_dreams_with_a_dream_trained_critic_in_reward_units(tmp_path):
    """--value-from DIR: DIR/ppo_dream_latest.pt's critic times its reward scaler's std (the PPO agent's value in
    the dream's reward units), only for the world model it was trained in; a resumed run keeps the same source."""
    ckpt = make_checkpoint_dir(tmp_path)
    save_actor_critic(ckpt)
    ppo = load_checkpoint(controller_path(ckpt, "ppo_dream"))
    scaler = {"mean": torch.zeros(1), "var": torch.full((1,), 4.0), "count": torch.tensor(10.0)}
    save_checkpoint(ckpt / "ppo_dream_latest.pt", {**ppo, "reward_scaler": scaler})
    value = load_dream_value(ckpt, ckpt / "world_model.pt", "cpu")
    obs = torch.randn(5, 20)
    torch.testing.assert_close(value(obs), value.agent.value(obs) * 2.0)
    assert value.agent.critic[0].weight.equal(ppo["state_dict"]["critic.0.weight"])

    save_episode(episode_path(tmp_path / "data", "random", 0), make_episode(12, 0))
    common = ["train_cmaes_in_dream.py", "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), *smoke.TINY["train_cmaes_in_dream"]]
    first = run_script(*common, "--generations", "1", "--value-from", str(ckpt))
    assert first.returncode == 0, first.stderr
    assert load_checkpoint(ckpt / "cmaes_latest.pt")["args"]["value_from"] == str(ckpt)
    without = run_script(*common, "--generations", "2")
    assert without.returncode == 2 and "other value_from" in without.stderr, without.stderr
    both = run_script(*common, "--generations", "2", "--value-from", str(ckpt), "--critic")
    assert both.returncode == 2 and "without --critic" in both.stderr and "Traceback" not in both.stderr

    other = tmp_path / "other"  # a PPO agent of another world model
    other.mkdir()
    save_checkpoint(other / "ppo_dream_latest.pt",
                    {**ppo, "reward_scaler": scaler, "world_model": {"path": "elsewhere", "sha256": "0" * 64}})
    mismatched = run_script(*common, "--generations", "2", "--value-from", str(other), "--fresh")
    assert mismatched.returncode == 2 and "another world model" in mismatched.stderr, mismatched.stderr
    assert "Traceback" not in mismatched.stderr


def test_init_from_agent_starts_the_evolutions_at_a_linear_fit_of_the_dream_agent(tmp_path):
    """distill_linear: the linear controller fitted to a (nonlinear) dream agent's actions on its own dreams is
    closer to the agent on new dreams than the best constant action; the script starts every evolution there (with
    a tiny step size the controller after a generation acts as the fit does), whether the evolutions dream from
    replayed states or whole episodes, and says so, or in one line why not; with --generations 0 the fit itself is
    the controller."""
    ckpt = make_checkpoint_dir(tmp_path)
    save_actor_critic(ckpt)
    for seed in range(2):
        save_episode(episode_path(tmp_path / "data", "random", seed), make_episode(12, seed))
    agent, _ = load_controller(controller_path(ckpt, "ppo_dream"), ckpt, ckpt / "world_model.pt")
    with torch.no_grad():
        agent.actor[-1].weight.mul_(300.0)  # a policy whose actions vary with [z, h]
    checkpoint = load_checkpoint(controller_path(ckpt, "ppo_dream"))
    save_checkpoint(controller_path(ckpt, "ppo_dream"), {**checkpoint, "state_dict": agent.state_dict()})
    vae, world_model, wm_checkpoint = load_vae_and_world_model(ckpt)
    starts = ReplayStarts(world_model, load_replay(tmp_path / "data", vae, ckpt / "vae.pt", 1, progress=False))
    bank = wm_checkpoint["start_bank"]
    flat = distill_linear(agent, world_model, bank, starts, 256, 6, run_seed=0, device="cpu", steps=300, batch=256)
    trajectory = {}
    dream = BatchedDream(world_model, bank["mu"], bank["logvar"], 128, max_steps=6)
    dream_fitness(dream, torch.zeros(1, 3 * 20 + 3), 128, torch.arange(128) + 10_000, *starts.sample(
        torch.rand(128, generator=torch.Generator().manual_seed(1))), trajectory=trajectory)
    obs = trajectory["obs"][:-1].flatten(0, 1)
    with torch.no_grad():
        target = agent.policy(obs).mode()
    flat = torch.as_tensor(flat, dtype=torch.float32)  # [W (3 x 20) row-major, b (3)]
    fitted = torch.tanh(obs @ flat[:60].view(3, 20).T + flat[60:])
    assert (fitted - target).pow(2).mean() < 0.5 * (target - target.mean(0)).pow(2).mean()

    common = ["train_cmaes_in_dream.py", "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
              "--data-dir", str(tmp_path / "data"), *smoke.TINY["train_cmaes_in_dream"], "--generations", "1"]
    result = run_script(*common, "--init-from-agent", str(ckpt), "--init-dreams", "64", "--sigma0", "1e-9")
    assert result.returncode == 0 and "start from the linear fit" in result.stdout, result.stderr
    written = load_checkpoint(controller_path(ckpt, "cmaes"))["state_dict"]
    linear = LinearController(ControllerConfig(kind="linear", obs_dim=20))
    linear.load_state_dict(written)
    with torch.no_grad():
        close = (torch.tanh(linear.linear(obs)) - target).pow(2).mean()
    assert close < 0.5 * (target - target.mean(0)).pow(2).mean(), "the evolutions started at the fit"

    def assert_starts_at_the_fit(state_dict: dict) -> None:  # the same fit the evolutions started from, to sigma's 1e-9
        for key, value in state_dict.items():
            torch.testing.assert_close(value, written[key], atol=1e-5, rtol=0)

    whole = run_script(*common, "--init-from-agent", str(ckpt), "--init-dreams", "64", "--sigma0", "1e-9",
                       "--no-replay", "--fresh")  # whole dreams to evolve in; the fit still dreams from the replays
    assert whole.returncode == 0 and "start from the linear fit" in whole.stdout, whole.stderr
    assert_starts_at_the_fit(load_checkpoint(controller_path(ckpt, "cmaes"))["state_dict"])
    refused = run_script(*common, "--init-from-agent", str(ckpt), "--init-dreams", "0", "--fresh")
    assert refused.returncode == 2 and "--init-dreams" in refused.stderr and "Traceback" not in refused.stderr
    fitted_only = run_script(*common[:-2], "--generations", "0", "--init-from-agent", str(ckpt), "--init-dreams", "64")
    assert fitted_only.returncode == 0 and "the linear fit, no generation" in fitted_only.stdout, fitted_only.stderr
    fit = load_checkpoint(controller_path(ckpt, "cmaes"))
    assert fit["generation"] == 0 and fit["args"]["init_from_agent"] == str(ckpt)
    assert_starts_at_the_fit(fit["state_dict"])
    nothing = run_script(*common[:-2], "--generations", "0")
    assert nothing.returncode == 2 and "0 only with --init-from-agent" in nothing.stderr


def test_cmaes_evolutions_side_by_side_are_the_runs_alone_averaged(tmp_path):
    """--evolutions 2 --seed 3, stopped after a generation and resumed: evolution k asks and dreams what the run
    alone with --seed 3 + k does, so the controller is the mean of those two runs' controllers (cma's sampling
    from numpy's global generator kept apart per evolution). A changed count, or a critic, is one line."""
    base = make_checkpoint_dir(tmp_path)
    for seed in range(2):
        save_episode(episode_path(tmp_path / "data", "random", seed), make_episode(12, seed))

    def run(name: str, *flags: str):
        ckpt = tmp_path / name
        if not ckpt.exists():
            shutil.copytree(base, ckpt)
        result = run_script("train_cmaes_in_dream.py", "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
                            "--data-dir", str(tmp_path / "data"), *smoke.TINY["train_cmaes_in_dream"], *flags)
        return result, ckpt

    alone = []
    for seed in ("3", "4"):
        result, ckpt = run(f"seed{seed}", "--seed", seed)
        assert result.returncode == 0, result.stderr
        alone.append(load_checkpoint(controller_path(ckpt, "cmaes"))["state_dict"])
    first, ckpt = run("both", "--seed", "3", "--evolutions", "2", "--generations", "1")
    assert first.returncode == 0 and "2 evolutions of population 4" in first.stdout, first.stderr
    resumed, ckpt = run("both", "--seed", "3", "--evolutions", "2")
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr
    together = load_checkpoint(controller_path(ckpt, "cmaes"))
    assert together["generation"] == 2 and len(load_checkpoint(ckpt / "cmaes_latest.pt")["es_states"]) == 2
    for key, value in together["state_dict"].items():
        torch.testing.assert_close(value, (alone[0][key] + alone[1][key]) / 2, rtol=1e-5, atol=1e-6)
    changed, _ = run("both", "--seed", "3", "--evolutions", "3", "--generations", "3")
    assert changed.returncode == 2 and "other evolutions (evolutions=2)" in changed.stderr, changed.stderr
    critic, _ = run("critic", "--evolutions", "2", "--critic")
    assert critic.returncode == 2 and "--evolutions 1" in critic.stderr and "Traceback" not in critic.stderr


def test_evaluate_writes_the_contract_json_and_repeats_itself(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    save_linear_controller(ckpt)
    results = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        result = run_script("evaluate.py", "--ckpt-dir", str(ckpt), "--episodes", "3", "--seed", "7",
                            "--max-steps", "40", "--workers", "2", "--out", str(out))
        assert result.returncode == 0, result.stderr
        results.append(json.loads(out.read_text()))
    first = results[0]
    assert {"env_id", "episodes", "seed", "mean", "std", "min", "max", "returns"} <= set(first)
    assert first["env_id"] == "CarRacing-v3" and first["episodes"] == 3 and first["seed"] == 7
    assert len(first["returns"]) == 3 and first["min"] <= first["mean"] <= first["max"]
    assert first["returns"] == results[1]["returns"], "the same seeds give the same returns"


def test_a_finished_evaluation_is_not_played_again(tmp_path, capsys, monkeypatch):
    """evaluate.py re-run on an OUT that holds the same evaluation (settings, agent files, code) prints its score and
    plays nothing (a resumed `make train` skips its finished evaluations); --again, another controller file, another
    setting or another code plays the tracks anew."""
    import evaluate
    import rollouts

    ckpt, out = make_checkpoint_dir(tmp_path), tmp_path / "eval.json"
    save_linear_controller(ckpt, seed=3)
    played, play = [], rollouts.evaluate_agent
    monkeypatch.setattr(evaluate, "evaluate_agent", lambda *a, **k: played.append(a) or play(*a, **k))

    def run(**changes) -> dict:
        evaluate.main(evaluate.Args(**{"ckpt_dir": ckpt, "controller": "cmaes", "episodes": 2, "seed": 7,
                                       "workers": 1, "max_steps": 30, "out": out} | changes))
        return json.loads(out.read_text())

    first = run()
    assert len(played) == 1 and first["identity"]["files"].keys() == {"vae.pt", "world_model.pt", "controller_cmaes.pt"}
    assert run() == first and len(played) == 1 and "already in" in capsys.readouterr().out
    assert run(again=True)["returns"] == first["returns"] and len(played) == 2, "--again plays the same tracks anew"
    assert run(max_steps=31)["identity"]["max_steps"] == 31 and len(played) == 3
    run()
    save_linear_controller(ckpt, seed=4)  # another controller in the same file
    changed = run()["identity"]["files"]
    assert changed["controller_cmaes.pt"] != first["identity"]["files"]["controller_cmaes.pt"] and len(played) == 5
    code = tmp_path / "code"  # the same files in another copy of the repo, one module changed
    code.mkdir()
    for module in Path(rollouts.__file__).parent.glob("*.py"):
        shutil.copy(module, code)
    before = rollouts.evaluation_identity(ckpt, "cmaes", 2, 7, 30, "fast", 0.0, "cpu")
    monkeypatch.setattr(rollouts, "__file__", str(code / "rollouts.py"))
    assert rollouts.evaluation_identity(ckpt, "cmaes", 2, 7, 30, "fast", 0.0, "cpu") == before
    (code / "envs.py").write_text((code / "envs.py").read_text() + "\n# changed\n")
    assert rollouts.evaluation_identity(ckpt, "cmaes", 2, 7, 30, "fast", 0.0, "cpu")["code"] != before["code"]
    out.write_text("{damaged")
    assert run()["returns"] and len(played) == 6


def test_damaged_or_mismatched_agents_are_one_clear_error(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    with pytest.raises(UserError, match="not found.*train_cmaes_in_dream.py"):
        load_agent(ckpt, "cmaes")
    with pytest.raises(UserError, match="unknown controller"):
        load_agent(ckpt, "nope")
    save_linear_controller(ckpt)
    path = controller_path(ckpt, "cmaes")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="damaged"):
        load_agent(ckpt, "cmaes")
    save_linear_controller(ckpt)
    checkpoint = load_checkpoint(ckpt / "world_model.pt")  # another world model (same VAE) in its place
    checkpoint["state_dict"] = {k: v + 1 for k, v in checkpoint["state_dict"].items()}
    save_checkpoint(ckpt / "world_model.pt", checkpoint)
    with pytest.raises(UserError, match="trained with another world model"):
        load_agent(ckpt, "cmaes")
    for args, message in [(["--ckpt-dir", str(tmp_path / "missing")], "not found"),
                          (["--ckpt-dir", str(ckpt), "--controller", "nope"], "nope")]:
        result = run_script("evaluate.py", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr


def test_collect_with_the_agent_policy(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    save_linear_controller(ckpt)
    result = run_script("collect_data.py", "--policy", "agent", "--ckpt-dir", str(ckpt), "--data-dir",
                        str(tmp_path / "data"), "--episodes", "2", "--max-steps", "20", "--workers", "1")
    assert result.returncode == 0, result.stderr
    from episodes import list_episodes, load_episode

    paths = list_episodes(tmp_path / "data", ["agent"])
    assert len(paths) == 2 and all(load_episode(p)["obs"].shape == (20, 64, 64, 3) for p in paths)


def test_cmaes_with_replay_dreams_from_common_real_states_for_horizon_decisions():
    """--replay: rollout r of every candidate starts from the same replayed real state (common random numbers),
    other generations from other states, and each dream lasts HORIZON decisions."""
    model = gas_pays_world_model()
    rng = np.random.default_rng(0)
    episodes = [{"mu": rng.normal(size=(30, 4)).astype(np.float32), "action": rng.uniform(0, 1, (30, 3))}
                for _ in range(3)]
    starts = ReplayStarts(model, episodes)
    z, state = generation_starts(starts, run_seed=0, generation=0, popsize=3, rollouts=4)
    assert z.shape == (12, 4) and torch.equal(z[:4], z[4:8]) and torch.equal(state[:4], state[8:])
    later, _ = generation_starts(starts, run_seed=0, generation=1, popsize=3, rollouts=4)
    assert not torch.equal(later[:4], z[:4])
    dream = BatchedDream(model, torch.zeros(3, 4), torch.full((3, 4), -2.0), 12, max_steps=7)  # 7 decisions
    solution = torch.cat([torch.zeros(3, 20).flatten(), torch.tensor([0.0, 10.0, -10.0])])  # bias: full gas
    fitness = dream_fitness(dream, solution.expand(3, -1).contiguous(), 4, torch.arange(4).repeat(3), z, state)
    assert torch.allclose(fitness, torch.full((3,), 7 * float(np.tanh(1.0))), atol=1e-3)


def test_a_killed_evaluation_resumes_from_its_finished_tracks(tmp_path):
    """evaluate_agent records each finished track in its progress file; a re-run of the same evaluation plays
    only the missing tracks (a recorded return is kept as it is), another evaluation's file is ignored, and
    the file is gone once the evaluation is complete."""
    from rollouts import evaluate_agent

    ckpt = make_checkpoint_dir(tmp_path)
    save_linear_controller(ckpt, seed=3)
    progress = tmp_path / "eval_cmaes.partial.json"
    full = evaluate_agent(ckpt, "cmaes", episodes=3, seed=11, workers=1, max_steps=40, progress=False,
                          progress_file=progress)
    assert not progress.exists()
    recorded = []

    def stop_after_one(summaries):  # a kill after the first track: what the progress file holds then
        recorded.append(json.loads(progress.read_text()))
        raise KeyboardInterrupt

    import rollouts

    original = rollouts.play_episodes
    try:
        rollouts.play_episodes = lambda *a, **k: original(*a, **{**k, "on_result": lambda s: (k["on_result"](s),
                                                                                               stop_after_one(s))})
        with pytest.raises(KeyboardInterrupt):
            evaluate_agent(ckpt, "cmaes", episodes=3, seed=11, workers=1, max_steps=40, progress=False,
                           progress_file=progress)
    finally:
        rollouts.play_episodes = original
    saved = recorded[0]
    assert [s["seed"] for s in saved["episodes"]] == [11]
    saved["episodes"][0]["return"] = 12345.0  # marks the recorded track: the resume must keep, not replay, it
    progress.write_text(json.dumps(saved))
    resumed = evaluate_agent(ckpt, "cmaes", episodes=3, seed=11, workers=1, max_steps=40, progress=False,
                             progress_file=progress)
    assert resumed["returns"] == [12345.0, *full["returns"][1:]] and not progress.exists()
    progress.write_text(json.dumps({**saved, "identity": {**saved["identity"], "noise": 0.5}}))
    assert evaluate_agent(ckpt, "cmaes", episodes=3, seed=11, workers=1, max_steps=40, progress=False,
                          progress_file=progress)["returns"] == full["returns"], "another evaluation's file is ignored"
