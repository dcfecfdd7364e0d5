import os
import re
import select
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, run_script
from envs import make_env
from episodes import is_complete_npz, list_episodes, load_episode
from rollouts import BrownianPolicy, collect_episodes
from utils import UserError


def test_collect_two_short_episodes_then_rerun_skips_them(tmp_path):
    summaries = collect_episodes(tmp_path, track_seeds=[7, 8], max_steps=30, workers=2, progress=False)
    assert sorted(s["seed"] for s in summaries) == [7, 8]
    paths = list_episodes(tmp_path)
    assert [p.name for p in paths] == ["ep_0000007.npz", "ep_0000008.npz"]
    for path in paths:
        episode = load_episode(path, ("obs", "action", "truncated", "action_repeat"))
        # one step per decision: 30 frames at the default action repeat 4 are 8 decisions, the last cut short
        assert episode["obs"].shape == (8, 64, 64, 3) and episode["obs"].dtype == np.uint8
        assert episode["action"].shape == (8, 3) and episode["truncated"][-1] and episode["action_repeat"] == 4
        assert -1 <= episode["action"][:, 0].min() and episode["action"][:, 1:].min() >= 0
    mtimes = [p.stat().st_mtime_ns for p in paths]
    assert collect_episodes(tmp_path, track_seeds=[7, 8], max_steps=30, workers=2, progress=False) == []
    assert [p.stat().st_mtime_ns for p in paths] == mtimes


def test_same_seed_gives_the_same_episode(tmp_path):
    collect_episodes(tmp_path / "a", [3], max_steps=20, workers=1, progress=False)
    collect_episodes(tmp_path / "b", [3], max_steps=20, workers=1, progress=False)
    a, b = (load_episode(list_episodes(tmp_path / d)[0]) for d in "ab")
    np.testing.assert_array_equal(a["obs"], b["obs"])
    np.testing.assert_array_equal(a["action"], b["action"])


def test_brownian_policy_is_smooth_and_bounded():
    policy = BrownianPolicy()
    policy.reset(0)
    no_road = np.zeros((64, 64, 3), np.uint8)  # nothing grey in view: pure noise
    actions = np.stack([policy(no_road) for _ in range(2000)])
    assert actions[:, 0].min() >= -1 and actions[:, 0].max() <= 1 and actions[:, 1:].min() >= 0
    steer = actions[:, 0]
    assert np.abs(np.diff(steer)).mean() < 0.25 * np.abs(steer - steer.mean()).mean() + 0.2  # drifts, not jitter
    assert steer.std() > 0.2 and (steer > 0.3).any() and (steer < -0.3).any()  # turns both ways
    assert actions[:, 1].mean() > 0.3 and (actions[:, 2] > 0).mean() < 0.3  # mostly drives, brakes in pulses


def test_unknown_or_missing_backend_is_a_clear_error(monkeypatch):
    with pytest.raises(UserError, match="choose one of fast, gymnasium, envpool"):
        make_env("nope")
    monkeypatch.setitem(sys.modules, "envpool", None)  # as if not installed
    with pytest.raises(UserError, match="pip install envpool"):
        make_env("envpool")


@pytest.mark.parametrize("args, message", [
    (["collect_data.py", "--data-dir", "{tmp}", "--env-backend", "nope", "--episodes", "1"],
     "unknown env backend 'nope'"),
    (["collect_data.py", "--data-dir", "{tmp}", "--episodes", "0"], "at least 1"),
    (["train_vae.py", "--data-dir", "{tmp}/empty", "--ckpt-dir", "{tmp}/ckpt", "--no-collect"], "no episodes in"),
    # a CUDA device this machine lacks: any CUDA without a GPU, an index past the last one with one
    (["train_vae.py", "--data-dir", "{tmp}", "--ckpt-dir", "{tmp}/ckpt", "--device",
      "cuda:99" if torch.cuda.is_available() else "cuda"], "sees" if torch.cuda.is_available() else "no CUDA"),
    (["evaluate.py", "--ckpt-dir", "{tmp}", "--device", "gpu"], "unknown device 'gpu'"),
    (["collect_data.py", "--data-dir", "/etc/hostname/data", "--episodes", "1"], "Not a directory"),
])
def test_user_errors_print_one_line_and_exit_nonzero(tmp_path, args, message):
    result = run_script(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def wait_for_output(process: subprocess.Popen, pattern: str, timeout: float = 90) -> str:
    """Read the process's stderr (tqdm's bar) as it comes until PATTERN (a regex) appears: the test acts on
    what the stage says it has done, not on a guess of how long that takes."""
    seen, deadline = "", time.monotonic() + timeout
    while not re.search(pattern, seen):
        ready, _, _ = select.select([process.stderr], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(process.stderr.fileno(), 4096).decode(errors="replace") if ready else ""
        assert chunk, f"the stage ended or stalled before saying {pattern!r}: {seen[-300:]!r}"
        seen += chunk
    return seen


def wait_for_exit(pids: list[int], timeout: float = 10) -> list[int]:
    """Block until the processes have ended (a pidfd turns readable then); returns those still running."""
    fds = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            pass  # already gone
    try:
        deadline = time.monotonic() + timeout
        while fds and time.monotonic() < deadline:
            ready, _, _ = select.select(list(fds), [], [], deadline - time.monotonic())
            for fd in ready:
                os.close(fd)
                del fds[fd]
        return list(fds.values())
    finally:
        for fd in fds:
            os.close(fd)


def test_killed_collection_leaves_no_half_file_no_stray_worker_and_resumes(tmp_path):
    command = [sys.executable, "collect_data.py", "--data-dir", str(tmp_path), "--episodes", "8",
               "--max-steps", "1000", "--workers", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_output(process, "episodes=[1-9]")  # a file landed (the bar may count two at once)
    workers = [int(pid) for pid in subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                                                  text=True).stdout.split()]
    assert workers, "the pool's worker processes are running"
    process.kill()  # the parent only, with no chance to clean up
    process.wait()
    assert not wait_for_exit(workers), "workers die with their parent"
    first = list_episodes(tmp_path)
    assert 1 <= len(first) < 8 and all(is_complete_npz(p) for p in first)
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"collected {8 - len(first)} episodes" in result.stdout
    paths = list_episodes(tmp_path)
    assert len(paths) == 8 and all(load_episode(p) is not None for p in paths)
    assert not list((tmp_path / "rollouts" / "random").glob(".*")), "stale temporary files are cleaned"


def test_terminate_signal_stops_a_stage_with_one_line(tmp_path):
    command = [sys.executable, "collect_data.py", "--data-dir", str(tmp_path), "--episodes", "8", "--workers", "2"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_for_output(process, r"[1-9]\d*/\d+ \[")  # the workers are playing: the bar counts their frames
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    stderr = stderr.decode()
    assert process.returncode != 0 and "Traceback" not in stderr
    assert "re-run the same command to resume" in stderr


def test_road_offset_points_at_the_grey_road():
    from rollouts import road_offset

    frame = np.full((64, 64, 3), (100, 200, 100), np.uint8)  # grass
    assert road_offset(frame) is None
    frame[:, 44:52] = 105  # a grey road to the right of the car (column 32)
    assert 0.5 < road_offset(frame) <= 1.0
    frame[:] = (100, 200, 100)
    frame[:, 10:18] = 105  # ... and to the left
    assert -1.0 <= road_offset(frame) < -0.5
