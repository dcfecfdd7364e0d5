import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_episode(steps: int = 20, seed: int = 0) -> dict:
    """A synthetic episode following the contract (random frames, no env needed)."""
    rng = np.random.default_rng(seed)
    return {
        "obs": rng.integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8),
        "action": rng.uniform(-1, 1, (steps, 3)).astype(np.float32),
        "reward": rng.normal(size=steps).astype(np.float32),
        "terminated": np.zeros(steps, bool),
        "truncated": np.r_[np.zeros(steps - 1, bool), True],
        "seed": seed,
    }


@pytest.fixture
def episode_factory():
    return make_episode


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a repo script the way a user does, in a fresh interpreter."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
