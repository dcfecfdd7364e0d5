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
PROBE_MODULES = ("numpy", "torch", "gymnasium", "Box2D", "cv2", "cma", "rollouts", "dream")
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


def _probe(modules: Sequence[str]) -> tuple[str, str | None]:
    """Run on each node: its id and the first of MODULES it cannot import (None: all there)."""
    import importlib

    import ray

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as error:  # an ImportError, or a module that fails while importing
            return ray.get_runtime_context().get_node_id(), f"{name} ({type(error).__name__}: {error})"
    return ray.get_runtime_context().get_node_id(), None


def connect(address: str, modules: Sequence[str] = PROBE_MODULES) -> None:
    """Join the Ray cluster at ADDRESS (`auto`: the one started on this machine, or RAY_ADDRESS) for this
    process, and check each alive node imports MODULES (the project and its packages)."""
    if _connected.get("address") == address:
        return
    try:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
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
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    probes = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(list(modules))
              for node in nodes]
    try:
        results = ray.get(probes, timeout=300)
    except Exception as error:
        ray.shutdown()
        raise UserError(f"the Ray cluster at {address} could not run this project's code: "
                        f"{type(error).__name__}: {str(error).splitlines()[0]}") from None
    missing = [(node, module) for node, module in results if module]
    if missing:
        ray.shutdown()
        node, module = missing[0]
        raise UserError(f"{len(missing)} of {len(nodes)} nodes of the Ray cluster at {address} cannot import "
                        f"{module} (node {node[:12]}): install requirements.txt on every node")
    _connected["address"] = address


def disconnect() -> None:
    """Leave the cluster (the tests join several clusters in one process)."""
    if _connected.pop("address", None) is not None:
        import ray

        ray.shutdown()


def cluster_cpus() -> int:
    """CPUs of the joined cluster, alive nodes only."""
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


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
                except ray.exceptions.RayTaskError as error:  # fn raised: the same error the pool path raises
                    raise error.as_instanceof_cause() from None
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.ObjectLostError) as error:
                    raise UserError(f"a Ray task failed {retries + 1} times ({type(error).__name__}); nodes keep "
                                    "dying or running out of memory: see `ray status`") from None
                yield item, result
    finally:
        for ref in pending:  # an interrupted map (Ctrl-C, an error) leaves nothing running on the cluster
            ray.cancel(ref, force=True)


def ship_files(paths: Sequence[Path]) -> dict[str, bytes]:
    """Files as {name: bytes}, to travel in a SHARED object (checkpoints: a few tens of MB at most)."""
    return {Path(path).name: Path(path).read_bytes() for path in paths}


def local_copy(files: dict[str, bytes]) -> Path:
    """The shipped files in a directory of this machine named by their content (written once per node,
    atomically: workers of one node share it)."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    directory = Path(tempfile.gettempdir()) / f"wm-shipped-{digest.hexdigest()[:16]}"
    for name, data in files.items():
        path = directory / name
        if not (path.exists() and path.stat().st_size == len(data)):
            atomic_write(path, lambda f, data=data: f.write(data))
    return directory


def worker_threads() -> None:
    """One torch thread per task: the cluster runs one task per CPU already."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
