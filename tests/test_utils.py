import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_episode
from episodes import (
    FrameStream,
    episode_path,
    is_complete_npz,
    list_episodes,
    load_episode,
    save_episode,
    split_episodes,
)
from utils import (
    StageArgs,
    UserError,
    atomic_path,
    checkpoint_identity,
    load_checkpoint,
    preprocess_frame,
    remove_stale_temps,
    resume_checkpoint,
    save_checkpoint,
    save_stage,
    stage_checkpoint,
)


def test_preprocess_shape_and_dtype():
    frame = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    small = preprocess_frame(frame)
    assert small.shape == (64, 64, 3) and small.dtype == np.uint8
    # area averaging: a constant frame stays constant
    assert (preprocess_frame(np.full((96, 96, 3), 77, np.uint8)) == 77).all()
    with pytest.raises(ValueError):
        preprocess_frame(np.zeros((96, 96), np.uint8))


def test_episode_round_trip(tmp_path):
    episode = make_episode(steps=15, seed=3)
    path = episode_path(tmp_path, "random", 3)
    save_episode(path, episode)
    assert path.name == "ep_0000003.npz" and is_complete_npz(path)
    assert not list(path.parent.glob(".*tmp*")), "no temporary file may remain"
    loaded = load_episode(path)
    for key in ("obs", "action", "reward", "terminated", "truncated"):
        np.testing.assert_array_equal(loaded[key], episode[key])
        assert loaded[key].dtype == np.asarray(episode[key]).dtype or key == "action"
    assert int(loaded["seed"]) == 3
    assert list_episodes(tmp_path) == [path]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong_shape", "missing_key"])
def test_bad_episode_file_is_skipped_with_one_warning(tmp_path, damage):
    good = episode_path(tmp_path, "random", 0)
    bad = episode_path(tmp_path, "random", 1)
    save_episode(good, make_episode(10, 0))
    if damage == "truncate":
        save_episode(bad, make_episode(10, 1))
        bad.write_bytes(bad.read_bytes()[:3000])
    elif damage == "garbage":
        bad.write_bytes(b"not a zip at all")
    elif damage == "wrong_shape":
        episode = make_episode(10, 1)
        np.savez(bad, **{**episode, "obs": np.zeros((10, 32, 32, 3), np.uint8)})
    else:
        episode = make_episode(10, 1)
        del episode["obs"]
        np.savez(bad, **episode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_episode(bad) is None
        batches = list(FrameStream(list_episodes(tmp_path), batch_size=5))
    assert len(caught) == 2 and all(str(bad) in str(w.message) for w in caught)  # one per read, naming the file
    assert sum(len(b) for b in batches) == 10  # the good episode still streams
    assert load_episode(good) is not None


def test_frame_stream_covers_every_frame_once(tmp_path):
    paths = []
    for seed in range(5):
        episode = make_episode(7, seed)
        episode["obs"][:] = seed  # tag frames by episode
        paths.append(episode_path(tmp_path, "random", seed))
        save_episode(paths[-1], episode)
    batches = list(FrameStream(paths, batch_size=4, buffer_episodes=2, drop_last=False))
    assert all(b.dtype == np.uint8 and b.shape[1:] == (64, 64, 3) for b in batches)
    tags = np.concatenate([b[:, 0, 0, 0] for b in batches])
    assert sorted(tags.tolist()) == sorted([s for s in range(5) for _ in range(7)])
    assert all(len(b) == 4 for b in list(FrameStream(paths, batch_size=4))), "drop_last gives full batches"


def test_split_is_by_episode_and_stable(tmp_path):
    paths = [Path(f"/x/ep_{i:07d}.npz") for i in range(200)]
    train, val = split_episodes(paths, val_percent=5)
    assert set(train).isdisjoint(val) and set(train) | set(val) == set(paths)
    assert 3 <= len(val) <= 20
    train_more, val_more = split_episodes(paths + [Path("/x/ep_0000999.npz")], val_percent=5)
    assert set(val) <= set(val_more), "adding data never moves an episode between splits"
    assert split_episodes(paths[:2], 5)[1], "tiny sets still hold one episode out"


def test_checkpoint_round_trip_and_damage(tmp_path):
    path = tmp_path / "model.pt"
    checkpoint = {"config": {"size": 3}, "state_dict": {"w": torch.ones(3)}, "args": {"path": "x"}, "epoch": 2}
    save_checkpoint(path, checkpoint)
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.ones(3))
    assert len(checkpoint_identity(path)["sha256"]) == 64
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError, match="damaged"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt", stage_hint="train_vae.py")


def test_a_kill_between_latest_and_output_is_finished_on_resume(tmp_path, monkeypatch):
    """save_stage writes *_latest.pt first: a kill before the best checkpoint leaves a latest that knows it is
    due, and the resume writes it from there (re-training would make another VAE and invalidate what follows)."""
    import utils

    model, args, config = torch.nn.Linear(2, 2), StageArgs(ckpt_dir=tmp_path), {"size": 2}
    optimizer_state = torch.optim.SGD(model.parameters(), 0.1).state_dict()
    best, latest = tmp_path / "vae.pt", tmp_path / "vae_latest.pt"

    def save_epoch(epoch: int) -> None:
        checkpoint = stage_checkpoint(config, model, args, tmp_path, epoch=epoch, best_val_loss=1.0 / epoch)
        save_stage(best, latest, checkpoint, {"optimizer": optimizer_state})

    save_epoch(1)
    with torch.no_grad():
        model.weight += 1
    save = utils.save_checkpoint

    def killed_after_the_first_file(path, checkpoint):
        monkeypatch.setattr(utils, "save_checkpoint", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
        save(path, checkpoint)

    monkeypatch.setattr(utils, "save_checkpoint", killed_after_the_first_file)
    with pytest.raises(KeyboardInterrupt):
        save_epoch(2)
    monkeypatch.undo()
    assert load_checkpoint(best)["epoch"] == 1 and load_checkpoint(latest)["epoch"] == 2

    resumed = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(resumed.parameters(), 0.1)
    assert resume_checkpoint(latest, best, args, config, resumed, optimizer, "cpu", "train_vae.py")["epoch"] == 2
    written = load_checkpoint(best)
    assert written["epoch"] == 2 and "optimizer" not in written and "out_due" not in written
    assert torch.equal(written["state_dict"]["weight"], model.weight) and torch.equal(resumed.weight, model.weight)
    resume_checkpoint(latest, best, args, config, resumed, optimizer, "cpu", "train_vae.py")  # nothing more to do
    assert load_checkpoint(best)["save_id"] == written["save_id"]


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale, live = tmp_path / f".vae.pt.tmp-{dead_pid}.pt", tmp_path / f".ep_0000001.npz.tmp-{os.getpid()}.npz"
    stale.write_bytes(b"half a file"), live.write_bytes(b"being written")
    with atomic_path(tmp_path / "picture.png") as temp:
        temp.write_bytes(b"png")
        assert temp.suffix == ".png" and not (tmp_path / "picture.png").exists()
    remove_stale_temps(tmp_path)
    assert not stale.exists() and live.exists() and (tmp_path / "picture.png").read_bytes() == b"png"


def test_device_names_are_checked():
    from utils import pick_device

    assert pick_device("cpu") == torch.device("cpu")
    for name in ("gpu", "cuda:x", "cpu:0", "cuda:"):
        with pytest.raises(UserError, match="unknown device"):
            pick_device(name)
    if not torch.cuda.is_available():
        for name in ("cuda", "cuda:0"):
            with pytest.raises(UserError, match="no CUDA device"):
                pick_device(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where there is one)")
def test_an_agent_saved_anywhere_plays_the_same_on_cpu_and_cuda(tmp_path):
    import numpy as np

    from agent import load_agent
    from conftest import make_checkpoint_dir, save_linear_controller

    ckpt = make_checkpoint_dir(tmp_path)
    save_linear_controller(ckpt)
    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    actions = [load_agent(ckpt, "cmaes", torch.device(device)).act(frame) for device in ("cpu", "cuda:0")]
    np.testing.assert_allclose(actions[0], actions[1], atol=1e-4)
