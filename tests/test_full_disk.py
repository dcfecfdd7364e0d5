"""A write that fails partway (a file-size limit, as a full disk does): the stage stops with one line naming the
file, and the last good files stay intact."""

import resource
import signal
import subprocess
import sys

import smoke
from conftest import ROOT, make_episode
from episodes import episode_path, list_episodes, save_episode
from utils import load_checkpoint


def run_with_file_limit(limit_bytes: int, *args: str) -> subprocess.CompletedProcess:
    """Run a script whose writes fail past LIMIT_BYTES per file (EFBIG, like ENOSPC on a full disk)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)


def assert_one_line_naming(result: subprocess.CompletedProcess, name: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and name in error_lines[0] and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_collection_on_a_full_disk_stops_with_one_line_and_no_half_file(tmp_path):
    result = run_with_file_limit(20_000, "collect_data.py", "--data-dir", str(tmp_path), "--episodes", "2",
                                 "--max-steps", "200", "--workers", "1")
    assert_one_line_naming(result, "ep_0000000.npz")
    assert not list_episodes(tmp_path) and not list((tmp_path / "rollouts" / "random").glob(".*"))


def test_a_checkpoint_that_cannot_be_written_leaves_the_last_good_one(tmp_path):
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    for seed in range(3):
        save_episode(episode_path(data, "random", seed), make_episode(40, seed))
    common = ["train_vae.py", "--data-dir", str(data), "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
              *smoke.TINY["train_vae"], "--no-collect"]
    assert subprocess.run([sys.executable, *common], cwd=ROOT, capture_output=True, timeout=300).returncode == 0
    good = {name: (ckpt / name).read_bytes() for name in ("vae.pt", "vae_latest.pt")}
    result = run_with_file_limit(1_000_000, *common, "--epochs", "2")  # the VAE checkpoint is ~17 MB
    assert_one_line_naming(result, "vae_latest.pt")
    assert {name: (ckpt / name).read_bytes() for name in good} == good, "the last good checkpoints are untouched"
    assert load_checkpoint(ckpt / "vae.pt")["epoch"] == 1 and not list(ckpt.glob(".*"))
