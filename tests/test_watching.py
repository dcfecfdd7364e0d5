import os

import imageio.v3 as iio
import pytest

from conftest import make_checkpoint_dir, run_script, save_linear_controller
from episodes import episode_path, load_episode


@pytest.fixture
def tiny_agent(tmp_path):
    ckpt = make_checkpoint_dir(tmp_path)
    save_linear_controller(ckpt)
    return ckpt


def run_headless(*args: str):
    os.environ["SDL_VIDEODRIVER"] = "dummy"  # inherited by the script: pygame without a window
    try:
        return run_script(*args)
    finally:
        del os.environ["SDL_VIDEODRIVER"]


def test_play_game_runs_an_agent_headless(tiny_agent):
    result = run_headless("play_game.py", "--ckpt-dir", str(tiny_agent), "--episodes", "2", "--max-steps", "15",
                          "--fps", "1000", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "episode 1: track 3, 15 steps" in result.stdout and "episode 2: track 4, 15 steps" in result.stdout


def test_play_game_records_a_human_episode(tmp_path):
    result = run_headless("play_game.py", "--human", "--episodes", "1", "--max-steps", "12", "--fps", "1000",
                          "--data-dir", str(tmp_path / "data"), "--seed", "9")
    assert result.returncode == 0, result.stderr
    episode = load_episode(episode_path(tmp_path / "data", "human", 9))
    assert episode["obs"].shape == (12, 64, 64, 3) and episode["truncated"][-1] and int(episode["seed"]) == 9


def test_play_game_without_a_display_points_to_videos(tiny_agent):
    saved = {key: os.environ.pop(key) for key in ("DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER") if key in os.environ}
    try:
        result = run_script("play_game.py", "--ckpt-dir", str(tiny_agent))
    finally:
        os.environ.update(saved)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no display" in result.stderr and "create_video.py" in result.stderr


@pytest.mark.parametrize("mode, size", [("play", (400, 600)), ("dream", (384, 384)), ("grid", (256, 768))])
def test_each_video_mode_writes_the_frames_asked_for(tiny_agent, tmp_path, mode, size):
    out = tmp_path / "videos" / f"{mode}.mp4"
    result = run_script("create_video.py", "--ckpt-dir", str(tiny_agent), "--mode", mode, "--steps", "12",
                        "--out", str(out), "--fps", "10")
    assert result.returncode == 0, result.stderr
    frames = iio.imread(out, index=None)
    assert frames.shape == (12, *size, 3)
    assert list(out.parent.iterdir()) == [out], "no temporary file is left behind"


def test_a_gif_video_is_written_at_the_asked_scale(tiny_agent, tmp_path):
    out = tmp_path / "agent.gif"
    result = run_script("create_video.py", "--ckpt-dir", str(tiny_agent), "--mode", "play", "--steps", "6",
                        "--out", str(out), "--scale", "0.5")
    assert result.returncode == 0, result.stderr
    frames = iio.imread(out, index=None)
    assert frames.shape[:3] == (6, 200, 300)


def test_video_errors_are_one_line(tiny_agent, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    for args, message in [(["--ckpt-dir", str(tmp_path / "missing")], "not found"),
                          (["--ckpt-dir", str(tiny_agent), "--mode", "nope"], "nope"),
                          (["--ckpt-dir", str(tiny_agent), "--out", str(tmp_path / "v.avi")], ".mp4 or .gif"),
                          (["--ckpt-dir", str(tiny_agent), "--steps", "2", "--out", str(blocker / "v.mp4")], "file")]:
        result = run_script("create_video.py", *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr and message in result.stderr, result.stderr


def test_plot_training_draws_a_tiny_runs_logs(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(tmp_path / "runs" / "ppo_dream-20260101-000000")
    for step in range(1, 40):
        writer.add_scalar("dream/episode_return", step * 2.0, step)
        writer.add_scalar("ppo/value_loss", 1.0 / step, step)
    writer.add_scalar("eval/real_return", 10.0, 20)
    writer.add_scalar("eval/dream_return", 30.0, 20)
    writer.close()
    result = run_script("plot_training.py", "--log-dir", str(tmp_path / "runs"), "--runs", "ppo_dream")
    assert result.returncode == 0, result.stderr
    image = iio.imread(tmp_path / "runs" / "plots" / "ppo_dream-20260101-000000.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    missing = run_script("plot_training.py", "--log-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "not found" in missing.stderr
