"""The short kill campaign: `make chaos` runs 20 kills on every stage; `make test` runs 3 on collection, the stage
whose result must be exactly the uninterrupted one (the others' resumes have their own tests, and ~20 s each here)."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos  # noqa: E402


def test_a_short_kill_campaign_leaves_nothing_partial_lost_or_different(tmp_path):
    out = tmp_path / "rows.json"
    chaos.main(chaos.Args(kills=3, stages=("collect_data.py random",), seed=1, out=out))
    [row] = json.loads(out.read_text())
    assert row["stage"] == "collect_data.py random" and row["kills"] == 3, "trials go on until 3 kills landed"
    assert 3 <= row["trials"] <= 3 * chaos.MAX_TRIALS and row["resumed"] == row["trials"], row["notes"]
    assert row["partial"] == row["lost_work"] == row["episode_errors"] == row["mismatches"] == 0, row["notes"]


def test_the_campaign_names_its_stages_and_refuses_unknown_ones(tmp_path):
    labels = [chaos.label(command) for command in chaos.campaign_pipeline(tmp_path)]
    assert {"collect_data.py random", "collect_data.py agent", "train_vae.py", "train_world_model.py",
            "train_cmaes_in_dream.py", "train_ppo.py", "train_ppo_in_dream.py", "evaluate.py ppo_dream",
            "create_video.py ppo", "train_dream_loop.py"} <= set(labels)
    vae = next(command for command in chaos.campaign_pipeline(tmp_path) if command[0] == "train_vae.py")
    assert vae[vae.index("--epochs") + 1] == "4", "LONGER's flags replace the tiny preset's"
    with pytest.raises(chaos.UserError, match="unknown stages"):
        chaos.main(chaos.Args(kills=1, stages=("train_everything.py",)))
