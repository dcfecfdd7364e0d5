import sys

import numpy as np
import pytest
import torch

import smoke
import train_vae
from agent import load_vae
from conftest import ROOT, make_episode, run_script
from conv_vae import ConvVAE, ConvVAEConfig
from envs import make_env
from episodes import episode_path, save_episode
from utils import UserError, load_checkpoint, preprocess_frame

TINY = ConvVAEConfig(latent_dim=8, channels=(8, 16, 16, 16))


def test_shapes_and_finite_loss():
    model = ConvVAE(TINY)
    frames = torch.randint(0, 256, (5, 64, 64, 3), dtype=torch.uint8)
    x = ConvVAE.to_input(frames)
    assert x.shape == (5, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (5, 8)
    recon, _, _ = model(x)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
    losses = model.loss(x)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss"] >= losses["recon"] + TINY.kl_tolerance * TINY.latent_dim - 1e-4  # the KL floor


def test_default_is_the_original_architecture():
    model = ConvVAE(ConvVAEConfig())
    assert sum(p.numel() for p in model.parameters()) == 4_348_547
    assert model.encode(torch.zeros(1, 3, 64, 64))[0].shape == (1, 32)

def test_the_dashboard_weight_scales_only_the_dashboard_rows_error():
    torch.manual_seed(0)
    plain = ConvVAE(TINY).eval()
    weighted = ConvVAE(ConvVAEConfig(latent_dim=8, channels=(8, 16, 16, 16), dashboard_weight=5.0)).eval()
    weighted.load_state_dict(plain.state_dict())
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        base, heavy = plain.loss(x, sample=False), weighted.loss(x, sample=False)
        error = (plain.decode(plain.encode(x)[0]) - x).pow(2)  # (B, 3, 64, 64)
    dashboard = error[:, :, 56:].sum((1, 2, 3)).mean()  # rows 56-63: the gauges' strip of a 64x64 frame
    assert all(torch.allclose(heavy[name], base[name]) for name in ("recon", "dashboard", "kl"))
    assert torch.allclose(base["dashboard"], dashboard)
    assert torch.allclose(heavy["loss"] - base["loss"], 4.0 * dashboard, rtol=1e-4)
    assert ConvVAEConfig.from_dict({"latent_dim": 32, "channels": [32, 64, 128, 256], "kl_tolerance": 0.5}) \
        == ConvVAEConfig(), "a checkpoint made before the weight existed loads as the original loss"



def test_a_tiny_epoch_lowers_the_loss():
    torch.manual_seed(0)
    model = ConvVAE(TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    # structured frames (blobs of colour) so there is something to learn
    frames = torch.zeros(32, 64, 64, 3, dtype=torch.uint8)
    for i in range(32):
        frames[i, (i % 4) * 16:(i % 4) * 16 + 16, :, i % 3] = 255
    x = ConvVAE.to_input(frames)
    with torch.no_grad():
        before = model.loss(x, sample=False)["recon"].item()
    for _ in range(40):
        loss = model.loss(x)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        after = model.loss(x, sample=False)["recon"].item()
    assert after < 0.7 * before


def test_bf16_training_learns_as_fp32_does_and_keeps_fp32_weights_and_loss():
    frames = np.zeros((32, 64, 64, 3), dtype=np.uint8)
    for i in range(32):
        frames[i, (i % 4) * 16:(i % 4) * 16 + 16, :, i % 3] = 255
    x = ConvVAE.to_input(torch.from_numpy(frames))
    recon = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = ConvVAE(TINY)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(40):
            losses = train_vae.train_step(model, optimizer, frames, torch.device("cpu"), precision)
        assert all(np.isfinite(value) for value in losses.values())
        assert all(p.dtype == torch.float32 for p in model.parameters())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            assert all(value.dtype == torch.float32 for value in model.loss(x).values()), "the loss is fp32"
        with torch.no_grad():
            recon[precision] = model.loss(x, sample=False)["recon"].item()
    assert recon["bf16"] < 1.2 * recon["fp32"], recon


def test_train_vae_checkpoints_resumes_and_rebuilds(tmp_path):
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    for seed in range(3):
        save_episode(episode_path(data, "random", seed), make_episode(40, seed))
    common = ["train_vae.py", "--data-dir", str(data), "--ckpt-dir", str(ckpt), "--log-dir", str(tmp_path / "runs"),
              *smoke.TINY["train_vae"], "--no-collect"]
    first = run_script(*common, "--epochs", "1")
    assert first.returncode == 0, first.stderr
    assert (ckpt / "vae.pt").exists() and (ckpt / "vae_latest.pt").exists() and (ckpt / "vae_recon.png").exists()
    second = run_script(*common, "--epochs", "2")
    assert second.returncode == 0, second.stderr
    assert "resuming from" in second.stdout and "epoch 2:" in second.stdout and "epoch 1:" not in second.stdout
    checkpoint = load_checkpoint(ckpt / "vae_latest.pt")
    assert checkpoint["epoch"] == 2 and np.isfinite(checkpoint["metrics"]["val_loss"])
    model, best = load_vae(ckpt / "vae.pt")  # rebuilt from the stored config with weights_only=True
    assert isinstance(model, ConvVAE)
    assert model.config == ConvVAEConfig(dashboard_weight=train_vae.Args.dashboard_weight)
    assert list(tmp_path.glob("runs/vae-*/events.out.tfevents.*")), "TensorBoard events are written"
    (ckpt / "vae.pt").write_bytes((ckpt / "vae.pt").read_bytes()[:1000])
    with pytest.raises(UserError, match="damaged"):
        load_vae(ckpt / "vae.pt")


def test_a_damaged_resume_checkpoint_is_one_clear_line(tmp_path):
    (tmp_path / "vae_latest.pt").write_bytes(b"\x80\x02 not a checkpoint")
    result = run_script("train_vae.py", "--ckpt-dir", str(tmp_path), "--data-dir", str(tmp_path / "data"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "damaged" in result.stderr and "--fresh" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_the_gauge_probe_reads_the_speed_and_steering_bars_of_real_frames(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from vae_gauges import gauge_readings, probe_r2

    env = make_env("fast")
    env.reset(seed=0)
    frames = [preprocess_frame(env.step(np.array([0.0, 0.0, 0.0], np.float32))[0]) for _ in range(50)]  # at rest
    for action in ([0.0, 1.0, 0.0],) * 30 + ([-1.0, 0.5, 0.0],) * 5 + ([1.0, 0.5, 0.0],) * 10:  # speed up, steer
        frames.append(preprocess_frame(env.step(np.array(action, np.float32))[0]))
    env.close()
    readings = gauge_readings(np.stack(frames))
    assert readings["speed"][49] < 1 < readings["speed"][79], "the speed bar is empty at rest and grows with gas"
    assert np.sign(readings["steering"][84]) == -np.sign(readings["steering"][94]) != 0, "the two ways show apart"
    features = np.random.default_rng(0).normal(size=(200, 3))
    target = features @ np.array([1.0, -2.0, 0.5]) + 3.0
    train = np.arange(200) < 100
    assert probe_r2(features, target, train) == pytest.approx(1.0)
    assert probe_r2(features, np.random.default_rng(1).normal(size=200), train) < 0.1
