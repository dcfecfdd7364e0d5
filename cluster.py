"""The Ray backend: the rollout-heavy work of a stage spread over a Ray cluster (`--ray-address auto|HOST:PORT`).

- `connect`: join the cluster once per process, shipping this project's code to its workers (a Ray
  runtime env), and check that every node can import what the stages need; an address that cannot be
  reached, or nodes without the packages, is one UserError line.
- `cluster_map`: call a module-level function `fn(shared, item)` on every item, one Ray task each, and
  yield (item, result) as they finish. SHARED (settings, model files) goes into the object store once
  per call, not once per task. A task whose worker process or node dies is run again elsewhere (Ray's task
  retries; a lost result is recomputed from its lineage), so each item yields exactly once: the caller
  writes its files, on the driver, once.
- `ship_files` / `local_copy`: checkpoint files as bytes in SHARED, written once per node to a directory
  named by their content, so a worker on another machine loads the same agent or world model.

Ray is imported here only, and only once an address is given: without one nothing of this runs.
"""

from __future__ import annotations

import hashlib
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

from utils import UserError, atomic_write

PROJECT_DIR = Path(__file__).resolve().parent
# never shipped to the workers: data, logs, weights (agents travel as files in SHARED), the venv, git
RUNTIME_EXCLUDES = ["data", "runs", "checkpoints", "pretrained", ".venv", ".git", "*.pt", "*.npz", "*.mp4", "*.gif"]
PROBE_MODULES = ("numpy", "torch", "gymnasium", "pygame", "Box2D", "cv2", "cma", "rollouts", "dream")
# the pinned packages that decide episodes and scores (requirements.txt): every node must have the driver's
PINNED = ("numpy", "torch", "gymnasium", "pygame-ce", "Box2D", "opencv-python-headless", "cma")
CONNECT_TIMEOUT_S = 10.0

_connected: dict = {}  # the address this process joined


def _reachable(address: str) -> None:
    """A HOST:PORT nobody listens on fails here in seconds, with one line, instead of in Ray's long retries."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address is `auto` or HOST:PORT (the head's GCS port, 6379 by default), not {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        raise UserError(f"no Ray cluster answers at {address} ({error.strerror or error}): start one with "
                        "`ray start --head` and pass the address it prints") from None


def _versions() -> dict[str, str | None]:
    import importlib.metadata

    versions = {}
    for name in PINNED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _probe(modules: Sequence[str]) -> tuple[str, str | None, dict]:
    """Run on each node: its id, the first of MODULES it cannot import (None: all there), the PINNED versions."""
    import importlib

    import ray

    node = ray.get_runtime_context().get_node_id()
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # an ImportError, or a module that fails while importing
            return node, f"{name} ({type(error).__name__}: {error})", {}
    return node, None, _versions()


def _check_nodes(address: str, modules: Sequence[str]) -> None:
    """Every alive node imports MODULES and has this machine's PINNED versions, and the cluster has CPUs; else a
    UserError naming the first node that does not."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    probes = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(list(modules))
              for node in nodes]
    try:
        ready, _ = ray.wait(probes, num_returns=len(probes), timeout=15)
        if len(ready) < len(probes):
            print(f"waiting for {len(probes) - len(ready)} of the {len(probes)} nodes of the Ray cluster to start a "
                  "worker with this project's code (up to 5 minutes)", flush=True)
        results = ray.get(probes, timeout=300)
    except Exception as error:
        raise UserError(f"the Ray cluster at {address} could not run this project's code: "
                        f"{type(error).__name__}: {' '.join(str(error).split())[:300]}") from None
    missing = [(node, module) for node, module, _ in results if module]
    if missing:
        node, module = missing[0]
        raise UserError(f"{len(missing)} of {len(nodes)} nodes of the Ray cluster at {address} cannot import "
                        f"{module} (node {node[:12]}): install requirements.txt on every node")
    here = _versions()
    other = [(node, name, version) for node, _, versions in results for name, version in versions.items()
             if version != here[name]]
    if other:
        node, name, version = other[0]
        raise UserError(f"node {node[:12]} of the Ray cluster at {address} has {name} {version}, this machine "
                        f"{here[name]}: the pinned versions decide episodes and scores, install requirements.txt "
                        "on every node")
    if not ray.cluster_resources().get("CPU"):
        raise UserError(f"the Ray cluster at {address} has no CPU to run tasks on (ray start --num-cpus N)")


def connect(address: str, modules: Sequence[str] = PROBE_MODULES) -> None:
    """Join the Ray cluster at ADDRESS (`auto`: the one started on this machine, or RAY_ADDRESS) for this
    process, and check each alive node imports MODULES (the project and its packages)."""
    if _connected.get("address") == address:
        return
    disconnect()
    try:
        import ray
    except ImportError:
        raise UserError("--ray-address needs Ray: pip install -r requirements-cluster.txt") from None
    if address != "auto":
        _reachable(address)
    if ray.is_initialized():
        ray.shutdown()
    runtime_env = {"working_dir": str(PROJECT_DIR), "excludes": RUNTIME_EXCLUDES,
                   "env_vars": {"OMP_NUM_THREADS": "1"}}
    try:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        raise UserError(f"cannot join the Ray cluster at {address}: {str(error).splitlines()[0]}") from None
    try:  # a cluster this project cannot use is left at once, with one line
        _check_nodes(address, modules)
    except UserError:
        ray.shutdown()
        raise
    _connected["address"] = address


def disconnect() -> None:
    """Leave the cluster (the tests join several clusters in one process)."""
    if _connected.pop("address", None) is not None:
        import ray

        ray.shutdown()


def cluster_cpus() -> int:
    """CPUs of the joined cluster, alive nodes only."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def node_id() -> str:
    """The Ray node this code runs on (in a task)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def cluster_map(address: str, fn: Callable, shared, items: Sequence, retries: int = 3) -> Iterator[tuple]:
    """fn(shared, item) for every item as one Ray task on the cluster at ADDRESS (one CPU each); yields (item,
    result) in the order they finish. fn must be a module-level function of this project (workers import it
    by name). A task whose worker or node dies is retried up to RETRIES times elsewhere; an exception
    raised by fn itself is not retried and is raised here."""
    connect(address)
    import ray

    task = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=False)(fn)
    shared_ref = ray.put(shared)
    pending = {task.remote(shared_ref, item): item for item in items}
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in done:
                item = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayTaskError as error:  # fn raised: the error the pool path raises
                    if isinstance(error.cause, (UserError, OSError)):  # one line, as on one machine
                        raise error.cause from None
                    raise error.as_instanceof_cause() from None
                except ray.exceptions.RayError as error:  # dead workers or nodes past the retries, memory, set-up
                    raise UserError(f"a Ray task failed ({type(error).__name__}: "
                                    f"{' '.join(str(error).split())[:200]}); see `ray status`") from None
                yield item, result
    finally:
        for ref in pending:  # an interrupted map (Ctrl-C, an error) leaves nothing running on the cluster
            ray.cancel(ref, force=True)


def ship_files(paths: Sequence[Path], root: Path | None = None) -> dict[str, bytes]:
    """Files as {name: bytes}, to travel in a SHARED object (checkpoints: a few tens of MB at most); a name is
    the path relative to ROOT when given (an ensemble's members live in subdirectories), else the file's name."""
    return {(Path(path).relative_to(root).as_posix() if root else Path(path).name): Path(path).read_bytes()
            for path in paths}


def content_key(files: dict[str, bytes]) -> str:
    """A name for a set of shipped files by their names and contents: workers rebuild what they cache from
    them only when it changes."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()[:16]


def local_copy(files: dict[str, bytes]) -> Path:
    """The shipped files in a directory of this machine named by their content. Each file is stored once per
    node by its own hash (the VAE that every check ships again is written once) and linked into the set's
    directory; both atomically, so the workers of one node can share them."""
    root = Path(tempfile.gettempdir()) / "wm-shipped"
    directory = root / content_key(files)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        if not (blob.exists() and blob.stat().st_size == len(data)):
            atomic_write(blob, lambda f, data=data: f.write(data))
        link = directory / name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            temporary = link.parent / f".{link.name}.{os.getpid()}"
            temporary.unlink(missing_ok=True)
            os.link(blob, temporary)
            os.replace(temporary, link)
    return directory


def worker_threads() -> None:
    """One torch thread per task: the cluster runs one task per CPU already."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
