"""One source for every default: each flag says what it does, and the Makefile passes the scripts' own defaults."""

import contextlib
import dataclasses
import importlib
import io
import re
import subprocess

import pytest
import tyro

from conftest import ROOT

SCRIPTS = ["collect_data", "train_vae", "train_world_model", "train_ppo", "train_ppo_in_dream", "train_cmaes_in_dream",
           "train_dream_loop", "evaluate", "create_video", "play_game", "plot_training"]


def flag_help(script: str, monkeypatch) -> dict[str, str]:
    """{--flag: its help text without the default} from the script's --help, as a user sees it."""
    monkeypatch.setenv("COLUMNS", "250")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        tyro.cli(importlib.import_module(script).Args, args=["--help"])
    options, current = {}, None
    for line in out.getvalue().splitlines():
        content = line.strip().strip("│").strip()
        match = re.match(r"(--[\w-]+)(?:, --[\w-]+)?(?: [\w{},.|\[\]-]+)?(?:\s{2,}(.*))?$", content)
        if match and content.startswith("--"):
            current = match.group(1)
            options[current] = match.group(2) or ""
        elif current and content and not content.startswith("╰"):
            options[current] += " " + content
        else:
            current = None
    return {flag: re.sub(r"\(default: .*\)$", "", text).strip() for flag, text in options.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_says_what_it_does(script, monkeypatch):
    helps = flag_help(script, monkeypatch)
    assert len(helps) >= 3, helps
    missing = [flag for flag, text in helps.items() if not text]
    assert not missing, f"{script}.py: flags without a --help line: {missing}"
    timed = [flag for flag, text in helps.items() if re.search(r"\d+(\.\d+)? ?(steps/s|frames/s|min|ms)\b|~\d", text)]
    assert not timed, f"{script}.py: timings of this machine belong in the README, not in --help: {timed}"


# Makefile knobs that are not a script's default, on purpose
MAKE_OWN = {"ITER_EPISODES": "an on-policy round drives fewer new tracks than a first data set has",
            "CKPT_DIR": "evaluate.py and the watching scripts play the shipped agent by default, make what it trained",
            "ENSEMBLE_SEED": "the second run of an ensemble needs another seed than the first (the default)",
            "FINETUNE_STEPS": "polishing a trained agent takes fewer steps than learning from zero",
            "FINETUNE_LR": "a trained agent moves in smaller steps than one learning from zero",
            "DREAM_SNAPSHOT_SPACING": "with DREAM_SNAPSHOTS=2, rounds 13 + 9 (run W0b's pair, shipped until "
                                      "2026-12-05); the loop alone spaces snapshots 2 rounds, for short runs"}


def makefile_knobs() -> tuple[dict[str, str], list[tuple[str, str, str]]]:
    """({VAR: value} of `VAR ?= value`, [(script, --flag, VAR)] of every `--flag $(VAR)` a recipe passes)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    values = dict(re.findall(r"^(\w+) \?= (.*)$", text, re.M))
    passed = []
    for line in text.splitlines():
        for script, arguments in re.findall(r"\$\(PY\) (\w+)\.py ([^;|&]*)", line):
            passed += [(script, flag, var) for flag, var in re.findall(r"(--[\w-]+) \$\((\w+)\)", arguments)]
    return values, passed


def test_the_makefile_passes_the_scripts_own_defaults():
    values, passed = makefile_knobs()
    assert len(passed) > 20, passed
    compared = 0
    for script, flag, var in passed:
        value = values.get(var, "")
        if var in MAKE_OWN or "$(" in value or var in ("PY", "RUN_DIR"):
            continue
        fields = {field.name: field for field in dataclasses.fields(importlib.import_module(script).Args)}
        field = fields[flag[2:].replace("-", "_")]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        assert str(default) == value, f"make passes {flag} $({var}) = {value} to {script}.py; its default: {default}"
        compared += 1
    assert compared >= 10


def test_make_train_is_the_shipped_recipe_in_order():
    """`make train` (dry run) is `make train-ppo`'s stages, then the dream loop on their VAE, then the pair of the two
    controllers, its evaluation and video, in this order; `make agent` (its old name) runs the same commands."""
    def dry_run(target: str) -> list[str]:
        result = subprocess.run(["make", "-n", target, "SEED=3", "CKPT_DIR=ck", "DATA_DIR=da"], cwd=ROOT,
                                capture_output=True, text=True, check=True)
        return [line for line in result.stdout.splitlines() if "/python " in line or line.startswith("if [")]

    lines = dry_run("train")
    expected = ["collect_data.py --data-dir da ", "train_vae.py --data-dir da --ckpt-dir ck ",
                "train_world_model.py --data-dir da --ckpt-dir ck ", "train_ppo.py --ckpt-dir ck ",
                "evaluate.py --ckpt-dir ck --controller ppo ", "create_video.py --ckpt-dir ck --controller ppo ",
                "cp -n ck/vae.pt ck/dream/", "train_dream_loop.py --data-dir da/dream --ckpt-dir ck/dream ",
                "evaluate.py --ckpt-dir ck/dream ",
                "make_ensemble.py --members ck ck/dream --controller ppo ppo_dream --out-dir ck",
                "evaluate.py --ckpt-dir ck --controller ensemble ",
                "create_video.py --ckpt-dir ck --controller ensemble "]
    found = [next((i for i, line in enumerate(lines) if piece in line), -1) for piece in expected]
    assert -1 not in found and found == sorted(found), list(zip(expected, found))
    assert all("--seed 3" in line for line in lines if "train_" in line and ".py" in line)
    assert dry_run("agent") == lines
