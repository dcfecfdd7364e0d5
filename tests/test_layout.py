"""The tree keeps its shape: modules import only modules below them, never scripts."""

import ast

from conftest import ROOT

# each module may import the models (conv_vae, world_model, actor_critic, fast_car_racing) and the modules
# before it here, never one after it nor a script: no cycles, and the architecture reads from the file names
MODULE_ORDER = ["utils", "cluster", "episodes", "agent", "envs", "rollouts", "dream", "utils_rl"]
MODELS = {"conv_vae", "world_model", "actor_critic", "fast_car_racing"}


def imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 0}
    names |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return {name.split(".")[0] for name in names}


def test_modules_import_only_models_and_earlier_modules():
    project = {path.stem for path in ROOT.glob("*.py")}
    for index, name in enumerate(MODULE_ORDER):
        local = imported_modules(ROOT / f"{name}.py") & project
        allowed = MODELS | set(MODULE_ORDER[:index])
        assert local <= allowed, f"{name}.py imports {sorted(local - allowed)}: only {sorted(allowed)} may be imported"
    for model in MODELS:
        assert not imported_modules(ROOT / f"{model}.py") & (project - MODELS), f"{model}.py imports a module"


def test_nothing_executes_code_from_a_file():
    """No pickle anywhere: np.load with allow_pickle=False, torch.load with weights_only=True only."""
    patterns = ("import pickle", "pickle.", "allow_pickle=True", "weights_only=False", "torch.load(")
    offenders = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("benchmarks/*.py")) + sorted(ROOT.glob("tests/*.py")):
        if path.name == "test_layout.py":
            continue
        for line_number, line in enumerate(path.read_text().splitlines(), 1):
            if any(pattern in line for pattern in patterns) and "weights_only=True" not in line:
                offenders.append(f"{path.name}:{line_number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
