"""Kill campaign: each stage that writes is SIGKILLed at seeded random moments, then re-run; what is left is
checked.

Reads:  nothing (it first runs the campaign's pipeline once, uninterrupted, as the reference: smoke.py's tiny
        stages, with LONGER's flags where a stage would otherwise save a single checkpoint, plus collection by
        the trained agent, a video and a two-round dream loop; only up to the last stage asked for).
Writes: a temporary dir (removed), stdout: one markdown table, and --out FILE.json if given.

Per stage and kill, the stage runs in its own process group, and the whole group (workers included) gets
SIGKILL after a delay drawn in [5%, 95%] of the stage's uninterrupted wall-clock (the shortest seen: a trial that
ends before its kill shortens it), trial after trial until KILLS kills landed before the stage's end. Then:
- partial files: every file under a final name in the run's dirs must load (episodes and latents through
  their loaders, checkpoints with weights_only=True, JSON, pictures and videos by their magic bytes);
- the re-run, without --fresh, must finish (exit 0);
- lost work: the re-run must resume from the progress the stage's *_latest.pt held at the kill (its
  "resuming from ...: epoch/update/generation N" line), so no more than one checkpoint interval is lost; the
  dream loop must resume with the rounds its dream_loop.json held ("resuming: N rounds done");
- episodes: the episode files must be those the uninterrupted run had after the stage, none missing, none
  extra;
- mismatches: the deterministic stages (collection, evaluation) must give the uninterrupted run's arrays
  and returns exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

import smoke
from episodes import list_episodes, load_episode, load_latent_episode
from smoke import label
from utils import UserError, run_main

ROOT = Path(__file__).resolve().parents[1]
MAGIC = {".png": b"\x89PNG", ".gif": b"GIF8", ".mp4": b"ftyp"}
PROGRESS = {"train_vae.py": "epoch", "train_world_model.py": "epoch", "train_ppo.py": "update",
            "train_ppo_in_dream.py": "update", "train_cmaes_in_dream.py": "generation"}
LATEST = {"train_vae.py": "vae_latest.pt", "train_world_model.py": "world_model_latest.pt",
          "train_ppo.py": "ppo_latest.pt", "train_ppo_in_dream.py": "ppo_dream_latest.pt",
          "train_cmaes_in_dream.py": "cmaes_latest.pt"}


# script -> flags over smoke.TINY's, so that each stage saves many times (a single save would hide lost work): each
# stage then runs ~5-26 s here, most of it after its first save
LONGER = {
    "collect_data": ["--episodes", "10", "--max-steps", "200"],
    "train_vae": ["--epochs", "4"],
    "train_world_model": ["--epochs", "60"],
    "train_cmaes_in_dream": ["--generations", "100"],
    "train_ppo": ["--total-steps", "1536"],  # 24 updates of 2 envs x 8 decisions x 4 frames
    "train_ppo_in_dream": ["--total-steps", "8192"],  # 32 updates of 8 dreams x 8 decisions x 4 frames
    "evaluate": ["--episodes", "8"],
}
MAX_TRIALS = 3  # trials per kill asked for, at most (a trial ends uninterrupted when its kill comes too late)
TINY_LOOP = ["--rounds", "2", "--random-episodes", "3", "--episodes-per-round", "2", "--vae-epochs", "1",
             "--wm-epochs", "2", "--wm-epochs-per-round", "1", "--updates-per-round", "3", "--num-envs", "8",
             "--horizon", "4", "--check-episodes", "1", "--max-steps", "60"]


@dataclasses.dataclass
class Args:
    kills: int = 20
    """SIGKILLs per stage"""
    stages: tuple[str, ...] = ()
    """stages to kill, by script (collect_data.py) or label (collect_data.py agent); default: all"""
    seed: int = 0
    """seed of the kill moments"""
    out: Path | None = None
    """also write the table's rows as JSON here"""


def longer(command: list[str]) -> list[str]:
    """COMMAND with LONGER's value for each flag LONGER sets for its script (added where COMMAND lacks it)."""
    flags = LONGER.get(Path(command[0]).stem, [])
    values = dict(zip(flags[::2], flags[1::2]))
    made = [values.get(command[i - 1], arg) if i else arg for i, arg in enumerate(command)]
    return made + [part for flag, value in values.items() if flag not in command for part in (flag, value)]


def campaign_pipeline(run_dir: Path) -> list[list[str]]:
    """smoke.py's stages made LONGER, collection by the trained PPO agent after train_ppo.py, a video of that
    agent, and a two-round dream loop in its own dirs, in order."""
    data, ckpt = str(run_dir / "data"), str(run_dir / "checkpoints")
    commands = [longer(command) for command in smoke.stages(run_dir)]
    agent = ["collect_data.py", "--data-dir", data, "--policy", "agent", "--ckpt-dir", ckpt, "--controller", "ppo",
             "--episodes", "8", "--max-steps", "200", "--seed", "500"]
    commands.insert(next(i for i, c in enumerate(commands) if c[0] == "train_ppo.py") + 1, agent)
    video = ["create_video.py", "--ckpt-dir", ckpt, "--controller", "ppo", "--steps", "20",
             "--out", str(run_dir / "videos" / "agent.gif")]
    loop = ["train_dream_loop.py", "--data-dir", str(run_dir / "loop_data"), "--ckpt-dir", str(run_dir / "loop"),
            "--log-dir", str(run_dir / "runs"), *TINY_LOOP]
    return [*commands, video, loop]


def run(command: list[str], kill_after: float | None = None, limit: float = 900) -> tuple[int | None, str, float]:
    """Run a stage in its own process group; with KILL_AFTER, SIGKILL the group then (and at LIMIT seconds in
    any case: a hang is a failure, not a wait). (returncode or None if killed, stdout, seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, *command], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=limit if kill_after is None else kill_after)
        return process.returncode, out, time.perf_counter() - start
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        return None, out, time.perf_counter() - start


def snapshot(run_dir: Path) -> dict[str, float]:
    """{relative path: mtime} of every file under final names (temporaries start with a dot)."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime for p in run_dir.rglob("*")
            if p.is_file() and not p.name.startswith(".") and "runs" not in p.relative_to(run_dir).parts}


def partial_files(run_dir: Path) -> list[str]:
    """Files under final names that do not load: each would be a half-written file."""
    bad = []
    for name in snapshot(run_dir):
        path = run_dir / name
        try:
            if path.suffix == ".npz":
                loader = load_latent_episode if "latents" in path.parts else load_episode
                ok = loader(path) is not None
            elif path.suffix == ".pt":
                ok = isinstance(torch.load(path, map_location="cpu", weights_only=True), dict)
            elif path.suffix == ".json":
                json.loads(path.read_text())
                ok = True
            elif path.suffix in MAGIC:
                ok = MAGIC[path.suffix] in path.read_bytes()[:16]
            else:
                ok = path.stat().st_size > 0
        except Exception:
            ok = False
        if not ok:
            bad.append(name)
    return bad


def progress_at(path: Path, key: str) -> int:
    """The progress (epoch, update, generation) a *_latest.pt holds, 0 if none."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get(key, 0))
    except Exception:  # missing or damaged (a damaged one is also counted as a partial file)
        return 0


def episode_arrays(paths: list[Path]) -> dict[str, dict]:
    return {p.name: load_episode(p) for p in paths}


def same_episodes(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(all(np.array_equal(a[k][key], b[k][key]) for key in a[k]) for k in a)


def loop_rounds(path: Path) -> int:
    """Finished rounds in a dream loop's record, 0 if none (or damaged: also counted as a partial file)."""
    try:
        return len(json.loads(path.read_text())["rounds"])
    except Exception:
        return 0


def kill_trials(command: list[str], before: Path, after: Path, outputs: list[str], seconds: float, kills: int,
                rng: random.Random, work: Path) -> dict:
    """Trials of one stage, each in a fresh copy of BEFORE (the run dir before the stage), until KILLS of them were
    killed before the stage ended (MAX_TRIALS x KILLS trials at most); AFTER is the uninterrupted run's dir after
    it."""
    script, row = command[0], {"stage": label(command), "trials": 0, "kills": 0, "saved": 0, "resumed": 0, "partial": 0,
                               "lost_work": 0, "episode_errors": 0, "mismatches": 0, "notes": []}
    files_before = snapshot(before)
    for trial in range(MAX_TRIALS * kills):  # until KILLS kills landed before the stage's end
        if row["kills"] == kills:
            break
        row["trials"] += 1
        trial_dir = work / f"trial{trial}"
        shutil.rmtree(trial_dir, ignore_errors=True)
        shutil.copytree(before, trial_dir)
        trial_command = [arg.replace(str(before), str(trial_dir)) for arg in command]
        code, _, took = run(trial_command, kill_after=rng.uniform(0.05, 0.95) * seconds)
        row["kills"] += code is None
        if code is not None:  # it ended before the kill: the reference run was slower, draw from this one's span
            seconds = min(seconds, took)
        # the kill came after the stage had saved something (so the re-run resumes rather than starts over)
        row["saved"] += code is None and any(files_before.get(name) != mtime
                                             for name, mtime in snapshot(trial_dir).items())
        bad = partial_files(trial_dir)
        row["partial"] += len(bad)
        if bad:
            row["notes"].append(f"partial after kill: {bad[:3]}")
        latest = trial_dir / "checkpoints" / LATEST.get(script, "-")
        held = progress_at(latest, PROGRESS.get(script, "-")) if script in PROGRESS else 0
        held_rounds = loop_rounds(trial_dir / "loop" / "dream_loop.json") if script == "train_dream_loop.py" else 0
        code, out, _ = run(trial_command)
        row["resumed"] += code == 0
        if code != 0:
            row["notes"].append(f"re-run failed ({code}): {out.strip().splitlines()[-1:] if out.strip() else ''}")
            continue
        if script in PROGRESS and held:
            started = re.search(rf"resuming from .*?: {PROGRESS[script]} (\d+)", out)
            finished = f"already {'trained' if 'ppo' in script else 'evolved'}" in out or "nothing to do" in out
            if not finished and (started is None or int(started.group(1)) != held):
                row["lost_work"] += 1
                row["notes"].append(f"held {held}, resumed from {started.group(1) if started else 'scratch'}")
        if held_rounds and f"resuming: {held_rounds} rounds done" not in out:
            row["lost_work"] += 1
            row["notes"].append(f"held {held_rounds} rounds, did not resume from them")
        bad = partial_files(trial_dir)
        row["partial"] += len(bad)
        if any(name.startswith("data/rollouts") for name in outputs):
            got = {p.name for p in list_episodes(trial_dir / "data")}
            want = {p.name for p in list_episodes(after / "data")}
            row["episode_errors"] += len(got ^ want)
            if got == want and not same_episodes(episode_arrays(list_episodes(trial_dir / "data")),
                                                 episode_arrays(list_episodes(after / "data"))):
                row["mismatches"] += 1
        if script == "evaluate.py":
            name = next(name for name in outputs if name.endswith(".json"))
            got = json.loads((trial_dir / name).read_text())["returns"]
            row["mismatches"] += got != json.loads((after / name).read_text())["returns"]
        shutil.rmtree(trial_dir)
    return row


def main(args: Args) -> None:
    if args.kills < 1:
        raise UserError("--kills must be at least 1")
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="wm-chaos-") as tmp:
        work, reference = Path(tmp), Path(tmp) / "reference"
        commands = campaign_pipeline(reference)
        names = {name for command in commands for name in (command[0], label(command))}
        unknown = set(args.stages) - names
        if unknown:
            raise UserError(f"unknown stages {sorted(unknown)}: choose from {sorted(names)}")
        wanted = [i for i, c in enumerate(commands) if not args.stages or {c[0], label(c)} & set(args.stages)]
        stages = []  # (command, dir before it, its outputs, seconds)
        for command in commands[:wanted[-1] + 1]:  # the reference run stops after the last stage asked for
            before = work / f"before{len(stages)}"
            if reference.exists():
                shutil.copytree(reference, before)
            else:
                before.mkdir()
            files = snapshot(reference) if reference.exists() else {}
            code, out, seconds = run(command)
            if code != 0:
                raise UserError(f"the uninterrupted {label(command)} failed: {out.strip().splitlines()[-1:]}")
            outputs = [name for name, mtime in snapshot(reference).items() if files.get(name) != mtime]
            stages.append((command, before, outputs, seconds))
            print(f"reference {label(command)}: {seconds:.1f} s, {len(outputs)} files", flush=True)
        for index in wanted:
            command, before, outputs, seconds = stages[index]
            after = stages[index + 1][1] if index + 1 < len(stages) else reference
            # the stage's command points at the reference dir: re-point it at its own copy of the dir before it
            own = [arg.replace(str(reference), str(before)) for arg in command]
            rows.append(kill_trials(own, before, after, outputs, seconds, args.kills, rng, work))
            print(f"{rows[-1]['stage']}: {rows[-1]}", flush=True)
    print(f"\n{args.kills} kills per stage\n\n| stage | trials | killed before the end | of them after a save "
          "| resumed | partial files | lost more than one interval | episodes missing or extra | mismatches |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stage']} | {row['trials']} | {row['kills']} | {row['saved']} | {row['resumed']} | "
              f"{row['partial']} | {row['lost_work']} | {row['episode_errors']} | {row['mismatches']} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    run_main(main, Args, description=__doc__)
