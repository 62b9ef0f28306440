"""Independent tasks on Ray: the one way stinfer starts Ray, limits threads and collects results.

Used by the cohort predictor (:mod:`stinfer.cohort`, one task per slide) and the benchmark
(:mod:`stinfer.evaluate.benchmark`, one task per cell). Ray is an optional extra
(:data:`RAY_INSTALL`): :func:`import_ray` returns ``None`` without it, and each caller decides
what that means (the cohort refuses ``workers > 1``; the benchmark warns and runs in-process).

A run with ``workers`` tasks at a time starts a local Ray with ``num_cpus=workers``
(:func:`ray_session`) unless Ray is already initialised (``ray.init(address=...)`` beforehand
runs the tasks on that cluster, whose workers must see the same paths). Each task asks for one
CPU, is never retried (a rerun retries: the callers skip what is done) and runs its function
through :func:`run_with_threads`, which limits torch's threads first so that ``workers`` tasks
share the machine's cores instead of each taking all of them. :func:`finished_tasks` yields
each task's result as it finishes; a worker that died (out of memory, killed) fails its own
task only.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

__all__ = [
    "RAY_INSTALL",
    "available_cores",
    "finished_tasks",
    "import_ray",
    "ray_session",
    "remote_task",
    "run_with_threads",
    "threads_per_worker",
]

RAY_INSTALL = 'pip install -e ".[distributed]" (or pip install ray)'

Key = TypeVar("Key")


def import_ray() -> Any | None:
    """The ``ray`` module, or ``None`` when Ray is not installed."""
    try:
        import ray
    except ImportError:
        return None
    return ray


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_worker(workers: int) -> int:
    """Torch threads of each of ``workers`` tasks running at once: the cores shared out, >= 1."""
    return max(1, available_cores() // max(1, workers))


def run_with_threads(threads: int, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` with torch limited to ``threads`` intra-op threads (a task's body)."""
    import torch

    torch.set_num_threads(threads)
    return function(*args)


@contextlib.contextmanager
def ray_session(ray: Any, workers: int) -> Iterator[None]:
    """A local Ray with ``num_cpus=workers`` for the block, shut down after it; an already
    initialised Ray (a cluster, a test's) is used as it is and left running."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def remote_task(ray: Any) -> Any:
    """:func:`run_with_threads` as a Ray task: one CPU, no GPU, no retries."""
    return ray.remote(num_cpus=1, max_retries=0)(run_with_threads)


def finished_tasks(ray: Any, running: Mapping[Any, Key]) -> Iterator[tuple[Key, Any, str]]:
    """``(key, result, "")`` for each task of ``running`` (object ref -> the caller's key) as
    it finishes; ``(key, None, message)`` when its worker died. A task that raised re-raises
    here (the task functions catch what they report, so that is a bug)."""
    remaining = list(running)
    while remaining:
        finished, remaining = ray.wait(remaining, num_returns=1)
        key = running[finished[0]]
        try:
            result = ray.get(finished[0])
        except ray.exceptions.RayTaskError:
            raise
        except ray.exceptions.RayError as error:
            yield key, None, "Ray worker: " + " ".join(str(error).split()[:40])
            continue
        yield key, result, ""
