"""The fast env must be indistinguishable from stock CarRacing-v3: frames, rewards, flags and infos."""

import math
import warnings

import gymnasium as gym
import numpy as np
import pytest

import fast_car_racing
from envs import make_env
from rollouts import BrownianPolicy
from utils import preprocess_frame


def pilot(env, lookahead: int = 8) -> np.ndarray:
    """Pure pursuit of a track waypoint a few tiles ahead, with a speed cap that drops in curves."""
    car, track = env.unwrapped.car, env.unwrapped.track
    x, y = car.hull.position
    nearest = int(np.argmin([(t[2] - x) ** 2 + (t[3] - y) ** 2 for t in track]))
    tx, ty = track[(nearest + lookahead) % len(track)][2:4]
    fx, fy = -math.sin(car.hull.angle), math.cos(car.hull.angle)
    error = math.atan2(fx * (ty - y) - fy * (tx - x), fx * (tx - x) + fy * (ty - y))
    speed = float(np.linalg.norm(car.hull.linearVelocity))
    return np.array([np.clip(-2 * error, -1, 1), 0.8 if speed < 85 - 70 * abs(error) else 0.0,
                     0.3 if speed > 95 - 70 * abs(error) else 0.0], np.float32)


def play_side_by_side(seed: int, driver: str, steps: int = 1000) -> dict:
    stock, fast = gym.make("CarRacing-v3"), gym.make(fast_car_racing.FAST_ENV_ID)
    stock_frame, _ = stock.reset(seed=seed)
    fast_frame, _ = fast.reset(seed=seed)
    assert np.array_equal(stock_frame, fast_frame), "reset frames differ"
    brownian = BrownianPolicy()
    brownian.reset(seed)
    outcome = {"steps": 0, "lap_finished": False, "left_playfield": False}
    for step in range(steps):
        use_pilot = driver == "pilot" or (driver == "mixed" and step >= 300)
        action = pilot(stock) if use_pilot else brownian(preprocess_frame(stock_frame))
        stock_result = stock.step(action)
        fast_result = fast.step(action)
        stock_frame = stock_result[0]
        assert np.array_equal(stock_result[0], fast_result[0]), f"frame differs at step {step}"
        assert stock_result[1:] == fast_result[1:], f"reward/flags/info differ at step {step}"
        outcome["steps"] = step + 1
        if stock_result[2] or stock_result[3]:
            outcome["lap_finished"] = stock_result[4].get("lap_finished", False)
            outcome["left_playfield"] = stock_result[1] == -100
            break
    return outcome


def test_the_pinned_versions_are_the_verified_ones():
    """requirements.txt pins gymnasium and pygame-ce to the versions the fast env was verified on: another
    version would silently turn the fast env into the stock one and skip its equivalence, so it fails here."""
    assert fast_car_racing.equivalence_verified(), (
        f"installed {fast_car_racing._installed_versions()}, verified {fast_car_racing.VERIFIED_VERSIONS}: "
        "install requirements.txt, or verify the fast env on the new versions and add them")


@pytest.mark.parametrize("seed, driver, expect", [
    (0, "brownian", "left_playfield"),  # wanders off the track and out of the map at step ~235
    (1, "pilot", "lap_finished"),       # a whole lap, ends at step ~650
    (2, "mixed", "full_length"),        # 300 steps of wandering on grass, then back to the road, 1000 steps
])
def test_fast_env_equals_stock(seed, driver, expect):
    outcome = play_side_by_side(seed, driver)
    if expect == "full_length":
        assert outcome["steps"] == 1000
    elif expect:
        assert outcome[expect], outcome


def test_unverified_versions_fall_back_to_stock_with_a_warning(monkeypatch):
    monkeypatch.setattr(fast_car_racing, "VERIFIED_VERSIONS", {"gymnasium": ("0.0.1",), "pygame-ce": ("0.0.1",)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        env = make_env("fast")
    assert env.spec.id == "CarRacing-v3" and not isinstance(env.unwrapped, fast_car_racing.FastCarRacing)
    assert len(caught) == 1 and "using stock CarRacing-v3" in str(caught[0].message)


def test_make_env_fast_is_the_fast_subclass():
    env = make_env("fast", max_steps=50)
    assert isinstance(env.unwrapped, fast_car_racing.FastCarRacing) == fast_car_racing.equivalence_verified()
    assert env.spec.max_episode_steps == 50
