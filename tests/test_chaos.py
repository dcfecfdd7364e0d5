"""The short kill campaign: `make chaos` runs 20 kills on every stage; `make test` runs 2 on the first two."""

import json
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos  # noqa: E402


def test_a_short_kill_campaign_leaves_nothing_partial_lost_or_different(tmp_path):
    out = tmp_path / "rows.json"
    chaos.main(chaos.Args(kills=2, stages=("collect_data.py random", "train_vae.py"), seed=1, out=out))
    rows = json.loads(out.read_text())
    assert [row["stage"] for row in rows] == ["collect_data.py random", "train_vae.py"]
    for row in rows:
        assert row["resumed"] == 2, row["notes"]
        assert row["partial"] == row["lost_work"] == row["episode_errors"] == row["mismatches"] == 0, row["notes"]
    assert sum(row["kills"] for row in rows) >= 2, "most kills land before the stage ends"


def test_the_campaign_names_its_stages_and_refuses_unknown_ones(tmp_path):
    labels = [chaos.label(command) for command in chaos.campaign_pipeline(tmp_path)]
    assert {"collect_data.py random", "collect_data.py agent", "train_vae.py", "train_world_model.py",
            "train_cmaes_in_dream.py", "train_ppo.py", "train_ppo_in_dream.py", "evaluate.py ppo_dream",
            "create_video.py ppo", "train_dream_loop.py"} <= set(labels)
    vae = next(command for command in chaos.campaign_pipeline(tmp_path) if command[0] == "train_vae.py")
    assert vae[vae.index("--epochs") + 1] == "4", "LONGER's flags replace the tiny preset's"
    with pytest.raises(chaos.UserError, match="unknown stages"):
        chaos.main(chaos.Args(kills=1, stages=("train_everything.py",)))
