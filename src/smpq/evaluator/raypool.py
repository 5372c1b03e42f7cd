"""The Ray backend of `smpq.evaluator`: actors that build a task once and evaluate chunks.

Ray is imported only when a `RayEvaluator` is made (`pip install 'smpq[ray]'`).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from smpq.errors import SmpqError
from smpq.evaluator.base import PoolEvaluator, Progress, ValueTask, WorkerLost

__all__ = ["RayEvaluator", "check_address"]


def _ray():
    try:
        import ray
    except ImportError:
        raise SmpqError("the ray backend needs Ray: pip install 'smpq[ray]'") from None
    return ray


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (one line) when nothing listens at a host:port Ray address."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SmpqError(f"a Ray address looks like HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise SmpqError(f"no Ray cluster answers at {address}: {exc.strerror or exc}") from None


def _connect(ray, address: str | None, workers: int | None) -> bool:
    """Start a local cluster (`workers` CPUs) or join `address`; True when we started Ray."""
    if ray.is_initialized():
        return False
    if address is not None:
        check_address(address)
        try:
            ray.init(address=address, log_to_driver=False, include_dashboard=False)
        except Exception as exc:  # ray raises ConnectionError, RuntimeError, ...
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SmpqError(f"cannot join the Ray cluster at {address}: {first}") from None
    else:
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return True


class _RayPool:
    """Ray actors, one per slot, each holding the built value function."""

    def __init__(self, task: ValueTask, workers: int | None, devices: Sequence[str],
                 address: str | None, actor_options: dict | None = None):
        ray = _ray()
        self.ray = ray
        self.owns = _connect(ray, address, workers)
        key = "GPU" if devices[0].startswith("cuda") else "CPU"
        have = int(ray.cluster_resources().get(key, 0))
        if workers is None:  # joined a cluster without a count: one worker per CPU (GPU) there
            workers = max(1, have)
        elif workers > have:  # actors beyond what the cluster has would wait forever
            if self.owns:
                ray.shutdown()
            where = f"the Ray cluster at {address}" if address else "this machine"
            raise SmpqError(f"--workers {workers} is more than the {have} {key}s of {where}; "
                            f"use at most {have}")
        self.size = workers
        self.devices = [devices[i % len(devices)] for i in range(workers)]
        self.task_ref = ray.put(task)
        self.actor_cls = ray.remote(_Actor)
        self.options = actor_options or {}
        try:
            self.actors = [self._start(i) for i in range(workers)]
            ray.get([a.ready.remote() for a in self.actors])  # every worker built the task
        except Exception:
            self.actors = getattr(self, "actors", [])
            self.close()
            raise

    def _start(self, slot: int):
        device = self.devices[slot]
        opts = {"num_cpus": 1, "max_restarts": 0, **self.options}
        if device.startswith("cuda"):
            opts.setdefault("num_gpus", 1)
            device = "cuda"  # Ray hands each actor its own GPU, visible as cuda:0
        return self.actor_cls.options(**opts).remote(self.task_ref, device)

    def submit(self, slot: int, rows: np.ndarray):
        return self.actors[slot].evaluate.remote(rows)

    def wait(self, handles):
        ready, _ = self.ray.wait(list(handles), num_returns=1)
        ref = ready[0]
        try:
            return ref, self.ray.get(ref)
        except self.ray.exceptions.RayActorError:
            raise WorkerLost(ref) from None
        except self.ray.exceptions.RayTaskError as exc:
            cause = exc.as_instanceof_cause()
            raise cause from None

    def replace(self, slot: int) -> None:
        try:
            self.ray.kill(self.actors[slot])
        except Exception:  # already gone
            pass
        self.actors[slot] = self._start(slot)

    def pid(self, slot: int) -> int:
        """The process id of a worker (tests kill it to check recovery)."""
        return int(self.ray.get(self.actors[slot].pid.remote()))

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:
                pass
        self.actors = []
        if self.owns and self.ray.is_initialized():
            self.ray.shutdown()


class _Actor:
    """A Ray worker: builds the task once, then evaluates chunks."""

    def __init__(self, task: ValueTask, device: str):
        self.fn = task.build(device)

    def ready(self) -> bool:
        return True

    def pid(self) -> int:
        import os

        return os.getpid()

    def evaluate(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        values = np.asarray(self.fn(rows), dtype=float)
        return values, time.perf_counter() - start


class RayEvaluator(PoolEvaluator):
    """Ray actors that build `task` once each; `workers` of them (one CPU each, or one GPU
    each for a `cuda` device). `address=None` starts a local cluster of `workers` CPUs (unless
    Ray is already initialised), else joins the cluster there."""

    def __init__(self, task: ValueTask, *, workers: int | None = 2,
                 address: str | None = None, device: str | Sequence[str] = "cpu",
                 progress: Progress | None = None, actor_options: dict | None = None,
                 **kwargs: Any):
        if workers is None and address is None:
            raise SmpqError("a local Ray cluster needs a number of workers")
        if workers is not None and workers < 1:
            raise SmpqError(f"workers must be >= 1, got {workers}")
        devices = [device] if isinstance(device, str) else list(device)
        super().__init__(_RayPool(task, workers, devices, address, actor_options),
                         progress=progress, **kwargs)


