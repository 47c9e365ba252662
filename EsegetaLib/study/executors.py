"""Where cases run: one after another in this process (`local`), or as Ray tasks (`ray`).

Both call `on_result(record)` as each case finishes (done or failed), in the order they finish;
the driver counts them and shows progress.  A case never stops the study: failures come back as
records.  Ray is imported only when asked for.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from .cases import lost_case, run_case

OnResult = Callable[[Dict[str, Any]], None]
ENGINES = ("local", "ray")


def run_local(tasks: List[Dict[str, Any]], on_result: OnResult, **_: Any) -> Dict[str, Any]:
    for task in tasks:
        on_result(run_case(task))
    return {"engine": "local"}


def _ray_case(task: Dict[str, Any]) -> Dict[str, Any]:
    """The Ray task (module level so workers import it by name rather than unpickling code)."""
    return run_case(task)


def _runtime_env(address: Optional[str]) -> Dict[str, Any]:
    """Let workers import this EsegetaLib. A local instance shares this machine's files, so adding
    the package's parent folder to PYTHONPATH is enough (a checkout need not be pip-installed);
    on a cluster (`address`) esegeta must be installed on every node (docs/readme/study.md)."""
    if address:
        return {}
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}}


def run_ray(tasks: List[Dict[str, Any]], on_result: OnResult, address: Optional[str] = None,
            engine: Optional[Dict[str, Any]] = None, note: Callable[[str], None] = lambda text: None,
            local_cpus: int = 2) -> Dict[str, Any]:
    """Submit every case as a Ray task and collect results as they finish.

    Each task asks for one GPU when the cluster has GPUs, else `cpus_per_task` CPUs.  Ray retries a
    task whose worker died (`max_retries`, bounded by the study's `retries`); a case that still
    fails is recorded as failed with the error.  Cases raise no exception of their own (run_case
    retries and records them), so `retry_exceptions` stays off.  Without `address` a local Ray
    instance with `local_cpus` CPUs is started, and shut down at the end (also on Ctrl-C)."""
    import ray

    engine = engine or {}
    started_here = not ray.is_initialized()
    if started_here:
        kwargs = dict(include_dashboard=False, log_to_driver=False, runtime_env=_runtime_env(address))
        try:
            if address:
                ray.init(address=address, **kwargs)
            else:
                # "local": a new instance, never a cluster found on this machine (ray.init() without
                # an address would join the last one started here). GPUs: whatever Ray detects.
                ray.init(address="local", num_cpus=local_cpus, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            from ..errors import EsegetaError

            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise EsegetaError(f"cannot start or reach {where} ({' '.join(str(exc).split())[:200]}); "
                               "check --address (e.g. HEAD:6379 or auto) and that 'ray start' runs there.") from None
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0))
        if gpus > 0:
            ask = {"num_gpus": int(engine.get("gpus_per_task", 1)) or 1, "num_cpus": 1}
        else:
            ask = {"num_cpus": max(int(engine.get("cpus_per_task", 1)), 1), "num_gpus": 0}
        note(f"Ray cluster: {resources.get('CPU', 0):g} CPUs, {gpus:g} GPUs; each case asks for "
             + ", ".join(f"{k.split('_')[1]}={v}" for k, v in ask.items()))
        remote = ray.remote(_ray_case).options(max_retries=int(engine.get("retries", 1)), retry_exceptions=False,
                                                **ask)
        pending = {remote.remote(task): task for task in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    task = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - a lost worker, an unpicklable error ...
                        text = " ".join(str(exc).split())[:500]
                        record = lost_case(task, f"{type(exc).__name__}: {text}")
                    on_result(record)
        finally:
            for ref in pending:  # interrupted driver: stop what has not finished
                ray.cancel(ref, force=True)
        return {"engine": "ray", "address": address, "cluster_resources": dict(resources), "task_resources": ask,
                "ray": ray.__version__}
    finally:
        if started_here:
            ray.shutdown()
