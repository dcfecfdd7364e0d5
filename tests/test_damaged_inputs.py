"""Damaged inputs, generated (hypothesis): truncated, bit-flipped, wrong-dtype, wrong-shape, NaN-filled, empty and
foreign files for every loader. Each is skipped with one warning naming the file (episodes, latents) or stopped
with one UserError (checkpoints, the dream loop's record): never a traceback, a hang or a silent wrong result."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import load_vae, load_world_model
from conftest import make_episode
from conv_vae import ConvVAE, ConvVAEConfig
from episodes import EPISODE_KEYS, LATENT_KEYS, load_episode, load_latent_episode, save_episode
from train_dream_loop import RECORD_KEYS, load_records
from train_dream_loop import Args as LoopArgs
from utils import UserError, save_checkpoint, stage_checkpoint
from world_model import WorldModelConfig, build_world_model

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,  # the same examples in every run
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def npz_bytes(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def valid_episode() -> dict:
    episode = make_episode(6, seed=1)
    episode["seed"] = np.int64(1)
    return episode


def valid_latents() -> dict:
    episode = valid_episode()
    rng = np.random.default_rng(0)
    return {"mu": rng.normal(size=(6, 4)).astype(np.float32), "logvar": rng.normal(size=(6, 4)).astype(np.float32),
            "vae_sha256": np.array("ab" * 32), "action_repeat": np.int64(4),
            **{key: episode[key] for key in ("action", "reward", "terminated", "truncated")}}


@st.composite
def damaged_bytes(draw, original: bytes) -> bytes:
    """The file cut short, overwritten in a stretch, replaced by noise, or emptied."""
    how = draw(st.sampled_from(["truncate", "overwrite", "noise", "empty"]))
    if how == "truncate":
        return original[:draw(st.integers(0, len(original) - 1))]
    if how == "overwrite":
        start = draw(st.integers(0, len(original) - 1))
        patch = draw(st.binary(min_size=1, max_size=64))
        return original[:start] + patch + original[start + len(patch):]
    if how == "noise":
        return draw(st.binary(min_size=1, max_size=2048))
    return b""


@st.composite
def damaged_arrays(draw, original: dict, keys: list[str]) -> dict:
    """A well-formed npz whose content breaks the contract: a key missing, of another dtype or shape, NaN-filled,
    or only foreign keys."""
    arrays = dict(original)
    key = draw(st.sampled_from(keys))
    how = draw(st.sampled_from(["missing", "dtype", "shape", "length", "nan", "foreign", "scalar"]))
    value = np.asarray(arrays[key])
    if how == "missing":
        del arrays[key]
    elif how == "dtype":  # of another kind (float16 for float32 is still a float: loaded, not a break)
        others = [dtype for dtype in (np.int64, np.float16, np.bool_, "U3", np.uint16)
                  if np.dtype(dtype).kind != value.dtype.kind or (key == "obs" and dtype == np.uint16)]
        arrays[key] = value.astype(draw(st.sampled_from(others)))
    elif how == "shape":
        arrays[key] = value.reshape(-1) if value.ndim > 1 else value[..., None].repeat(2, -1)
    elif how == "length":
        arrays[key] = value[:-1] if value.ndim and len(value) > 1 else np.stack([value, value])
    elif how == "nan":
        if value.dtype.kind != "f":
            key = "reward"
        arrays[key] = np.full_like(np.asarray(arrays[key]), np.nan)
    elif how == "scalar":
        arrays[key] = np.asarray(value.flat[0])
    else:
        arrays = {"something_else": np.zeros(3)}
    return arrays


def load_quietly(load, path):
    """(result, warnings) of a loader."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = load(path)
    return result, caught


def assert_skipped_or_intact(result, caught, path, original: dict, keys) -> None:
    if result is None:
        assert len(caught) == 1 and str(path) in str(caught[0].message), [str(w.message) for w in caught]
    else:  # damage where nothing is read (a zip's slack) may load: then it is the original, never something else
        for key in keys:
            np.testing.assert_array_equal(result[key], np.asarray(original[key]))


def check_npz_loader(data, path, original: dict, damaged_keys: list[str], load, kept_keys) -> None:
    """Write one damaged version of ORIGINAL (bytes damage, or contract damage to DAMAGED_KEYS) and load it."""
    if data.draw(st.booleans()):
        path.write_bytes(data.draw(damaged_bytes(npz_bytes(original))))
        expect_skip = False
    else:
        path.write_bytes(npz_bytes(data.draw(damaged_arrays(original, damaged_keys))))
        expect_skip = True
    result, caught = load_quietly(load, path)
    assert result is None or not expect_skip, "a file that breaks the contract must not load"
    assert_skipped_or_intact(result, caught, path, original, kept_keys)


@SETTINGS
@given(data=st.data())
def test_damaged_episode_files_are_skipped_with_one_warning(tmp_path, data):
    check_npz_loader(data, tmp_path / "ep.npz", valid_episode(), ["obs", "action", "reward", "terminated", "truncated"],
                     load_episode, EPISODE_KEYS)


@SETTINGS
@given(data=st.data())
def test_damaged_latent_files_are_skipped_with_one_warning(tmp_path, data):
    check_npz_loader(data, tmp_path / "latent.npz", valid_latents(), ["mu", "logvar", "action", "reward", "terminated"],
                     lambda path: load_latent_episode(path, "ab" * 32), [k for k in LATENT_KEYS if k != "vae_sha256"])


def tiny_checkpoints(tmp_path) -> dict:
    """{loader: a valid checkpoint's bytes} for the VAE and world-model loaders (controllers use the same load)."""
    torch.manual_seed(0)  # the same files in every run: a failure found is a failure replayed
    vae = ConvVAE(ConvVAEConfig(latent_dim=4, channels=(4, 4, 4, 4)))
    world_model = build_world_model(WorldModelConfig(latent_dim=4, hidden_dim=8, num_mixtures=2))
    made = {}
    for loader, model in ((load_vae, vae), (load_world_model, world_model)):
        path = tmp_path / "valid.pt"
        save_checkpoint(path, stage_checkpoint(model.config, model, {}, tmp_path, epoch=1))
        made[loader] = path.read_bytes()
    return made


@st.composite
def damaged_checkpoint(draw, original: bytes) -> bytes:
    """Bytes damage, or a readable torch file with the wrong things in it."""
    if draw(st.booleans()):
        return draw(damaged_bytes(original))
    checkpoint = torch.load(io.BytesIO(original), weights_only=True)
    how = draw(st.sampled_from(["nan", "shape", "missing_weight", "config_type", "config_key", "foreign",
                                "no_state_dict", "json"]))
    name = draw(st.sampled_from(sorted(checkpoint["state_dict"])))
    if how == "nan":
        name = next(k for k, v in checkpoint["state_dict"].items() if v.is_floating_point() and v.numel())
        checkpoint["state_dict"][name] = torch.full_like(checkpoint["state_dict"][name], float("nan"))
    elif how == "shape":
        checkpoint["state_dict"][name] = torch.zeros(3, 1, 2)
    elif how == "missing_weight":
        del checkpoint["state_dict"][name]
    elif how == "config_type":
        checkpoint["config"][draw(st.sampled_from(sorted(checkpoint["config"])))] = "many"
    elif how == "config_key":
        checkpoint["config"]["no_such_setting"] = 1
    elif how == "foreign":
        checkpoint = draw(st.sampled_from([[1, 2], torch.zeros(3), {"weights": torch.zeros(2)}, "text"]))
    elif how == "no_state_dict":
        checkpoint = {"config": checkpoint["config"]}
    else:
        return json.dumps({"config": {}, "state_dict": {}}).encode()
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


@SETTINGS
@given(data=st.data())
def test_damaged_checkpoints_stop_with_one_clear_error(tmp_path, data):
    loader, original = data.draw(st.sampled_from(sorted(tiny_checkpoints(tmp_path).items(), key=lambda x: str(x))))
    damaged = data.draw(damaged_checkpoint(original))
    path = tmp_path / "damaged.pt"
    path.write_bytes(damaged)
    try:
        model, _ = loader(path)
    except UserError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    reference, _ = loader(_write(tmp_path / "reference.pt", original))  # loaded: then it is the original, intact
    for (name, value), (_, expected) in zip(model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(value, expected), name


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=8)


@SETTINGS
@given(data=st.data())
def test_a_damaged_dream_loop_record_stops_with_one_clear_error(tmp_path, data):
    args = LoopArgs(data_dir=tmp_path / "data", ckpt_dir=tmp_path)
    record = {"round": 0, "real_frames": 10, "wall_seconds": 1.0, "dream_return": 5.0, "real_return": 3.0}
    valid = {"args": {k: str(v) for k, v in vars(args).items()}, "rounds": [record]}
    path = tmp_path / "dream_loop.json"
    how = data.draw(st.sampled_from(["bytes", "json", "rounds", "args"]))
    if how == "bytes":
        path.write_bytes(data.draw(damaged_bytes(json.dumps(valid).encode())))
    elif how == "json":
        path.write_text(json.dumps(data.draw(json_values)))
    else:
        path.write_text(json.dumps({**valid, how: data.draw(json_values)}))
    try:
        records = load_records(path, args)
    except UserError as error:
        assert str(path) in str(error) and "\n" not in str(error)
        return
    assert all(isinstance(record.get(key), (int, float)) for record in records for key in RECORD_KEYS)


def test_the_undamaged_files_load(tmp_path):
    """The generators' starting points are valid, so every failure above is the damage's."""
    save_episode(tmp_path / "ep.npz", valid_episode())
    assert load_episode(tmp_path / "ep.npz") is not None
    (tmp_path / "latent.npz").write_bytes(npz_bytes(valid_latents()))
    assert load_latent_episode(tmp_path / "latent.npz", "ab" * 32) is not None
    for loader, original in tiny_checkpoints(tmp_path).items():
        loader(_write(tmp_path / "ok.pt", original))
    with pytest.raises(UserError):
        load_records(_write(tmp_path / "x.json", b"{"), LoopArgs())
