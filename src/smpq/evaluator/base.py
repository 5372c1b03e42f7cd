"""The evaluator interface, its memo and counts, the local backend, and pools of workers."""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from smpq.errors import SmpqError

__all__ = [
    "BACKENDS",
    "Evaluator",
    "EvaluatorConfig",
    "FunctionTask",
    "LocalEvaluator",
    "PoolEvaluator",
    "ValueFn",
    "ValueTask",
    "WorkerLost",
    "WorkerPool",
    "make_evaluator",
]

log = logging.getLogger(__name__)

ValueFn = Callable[[np.ndarray], np.ndarray]
Progress = Callable[[int, int, int], None]  # (done, planned, workers in use)
Row = tuple[int, ...]
BACKENDS = ("local", "ray")


class ValueTask(Protocol):
    """How to build a value function; must pickle (it travels to every worker)."""

    def build(self, device: str = "cpu") -> ValueFn:
        """The value function: rows (n, units) -> values (n,), rows evaluated independently."""
        ...


@dataclass(frozen=True)
class FunctionTask:
    """A task around a picklable value function (module-level), for tests and small games."""

    fn: ValueFn

    def build(self, device: str = "cpu") -> ValueFn:
        return self.fn


def _key(row: np.ndarray) -> Row:
    return tuple(int(x) for x in row)


class Evaluator:
    """Memoised batch evaluation; subclasses say how missing rows get their values.

    `calls` counts rows actually evaluated (memo hits are free), `forward_seconds` the seconds
    spent inside value functions (summed over workers), `batches` the backend round trips and
    `wall_seconds` their wall time (so overhead = wall - forward / workers).
    """

    workers = 1

    def __init__(self, progress: Progress | None = None):
        self.progress = progress
        self.memo: dict[Row, float] = {}
        self.calls = 0
        self.forward_seconds = 0.0
        self.wall_seconds = 0.0
        self.batches = 0

    def evaluate(self, rows: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
        """Values of `rows` (n, units), in their order; only rows not seen before are run."""
        arr = np.asarray(rows)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise SmpqError(f"rows must be a 2-D array (n, units), got shape {arr.shape}")
        keys = [_key(r) for r in arr]
        missing: dict[Row, None] = {}
        for k in keys:
            if k not in self.memo:
                missing.setdefault(k)
        if missing:
            kind = bool if arr.dtype == bool else np.int64  # coalitions stay boolean masks
            todo = np.array(list(missing), dtype=kind).reshape(len(missing), arr.shape[1])
            start = time.perf_counter()
            values, seconds = self._run(todo)
            values = np.asarray(values, dtype=float).reshape(-1)
            if values.shape != (len(todo),):
                raise SmpqError(f"the value function returned {values.shape[0]} values for "
                                f"{len(todo)} rows")
            self.wall_seconds += time.perf_counter() - start
            self.forward_seconds += seconds
            self.calls += len(todo)
            self.batches += 1
            self.memo.update(zip(missing, (float(v) for v in values), strict=True))
        return np.array([self.memo[k] for k in keys], dtype=float)

    __call__ = evaluate

    def _run(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        """(values, seconds inside value functions) of distinct, unseen rows."""
        raise NotImplementedError

    def _tick(self, done: int, planned: int) -> None:
        if self.progress is not None:
            self.progress(done, planned, self.workers)

    def close(self) -> None:
        """Release workers (a no-op for the local backend)."""

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalEvaluator(Evaluator):
    """Values in this process: from a ready value function, or a task built on first use."""

    def __init__(self, task: ValueTask | None = None, *, fn: ValueFn | None = None,
                 device: str = "cpu", progress: Progress | None = None):
        if (task is None) == (fn is None):
            raise SmpqError("LocalEvaluator takes a task or a value function (one of them)")
        super().__init__(progress)
        self.task, self.device, self._fn = task, device, fn

    def _run(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        if self._fn is None:
            self._fn = self.task.build(self.device)
        start = time.perf_counter()
        values = self._fn(rows)
        seconds = time.perf_counter() - start
        self._tick(len(rows), len(rows))
        return values, seconds


# -- pools of workers ---------------------------------------------------------------------

class WorkerLost(Exception):
    """A worker died (process killed, node lost) while evaluating a chunk."""


class WorkerPool(Protocol):
    """Workers that each built the task once; `PoolEvaluator` schedules chunks on them."""

    size: int

    def submit(self, slot: int, rows: np.ndarray) -> Hashable:
        """Start evaluating `rows` on worker `slot`; a handle for `wait`."""
        ...

    def wait(self, handles: Sequence[Hashable]) -> tuple[Hashable, tuple[np.ndarray, float]]:
        """One finished handle and its (values, seconds); raises WorkerLost(handle) when the
        worker died (exc.args[0] is the handle), and the value function's own errors as is."""
        ...

    def replace(self, slot: int) -> None:
        """Start a fresh worker in `slot` (it builds the task again)."""
        ...

    def close(self) -> None:
        ...


class PoolEvaluator(Evaluator):
    """Splits each batch into chunks, runs them on a pool's free workers, reassembles in order.

    A chunk whose worker died is re-queued on a fresh worker in that slot; a chunk lost more
    than `max_retries` times is an SmpqError. Chunks: about `chunks_per_worker` per worker, so
    a slow worker does not hold up the batch; no chunk holds fewer than `min_chunk` rows.
    """

    def __init__(self, pool: WorkerPool, *, chunks_per_worker: int = 2, min_chunk: int = 1,
                 max_retries: int = 3, progress: Progress | None = None):
        super().__init__(progress)
        if pool.size < 1:
            raise SmpqError("a worker pool needs at least one worker")
        self.pool, self.workers = pool, pool.size
        self.chunks_per_worker, self.min_chunk = max(1, chunks_per_worker), max(1, min_chunk)
        self.max_retries = max_retries
        self.replaced = 0

    def _chunks(self, n: int) -> list[tuple[int, int]]:
        size = max(self.min_chunk, math.ceil(n / (self.workers * self.chunks_per_worker)))
        return [(a, min(a + size, n)) for a in range(0, n, size)]

    def _run(self, rows: np.ndarray) -> tuple[np.ndarray, float]:
        chunks = self._chunks(len(rows))
        pending, idle = deque(range(len(chunks))), deque(range(self.workers))
        running: dict[Hashable, tuple[int, int]] = {}  # handle -> (slot, chunk)
        results: list[np.ndarray | None] = [None] * len(chunks)
        lost = [0] * len(chunks)
        seconds, done = 0.0, 0
        while pending or running:
            while pending and idle:
                slot, ci = idle.popleft(), pending.popleft()
                a, b = chunks[ci]
                running[self.pool.submit(slot, rows[a:b])] = (slot, ci)
            try:
                handle, (values, secs) = self.pool.wait(list(running))
            except WorkerLost as exc:
                slot, ci = running.pop(exc.args[0])
                lost[ci] += 1
                if lost[ci] > self.max_retries:
                    raise SmpqError(f"a chunk of {chunks[ci][1] - chunks[ci][0]} evaluations "
                                    f"lost its worker {lost[ci]} times; giving up") from None
                log.warning("worker %d lost mid-batch; replacing it and re-running its chunk",
                            slot)
                self.pool.replace(slot)
                self.replaced += 1
                pending.appendleft(ci)
                idle.append(slot)
                continue
            slot, ci = running.pop(handle)
            results[ci] = np.asarray(values, dtype=float).reshape(-1)
            seconds += float(secs)
            done += chunks[ci][1] - chunks[ci][0]
            idle.append(slot)
            self._tick(done, len(rows))
        return np.concatenate(results), seconds

    def close(self) -> None:
        self.pool.close()


# -- configuration ------------------------------------------------------------------------

@dataclass(frozen=True)
class EvaluatorConfig:
    """Which backend evaluates values: `workers=0` and no address is the local backend."""

    workers: int = 0
    address: str | None = None
    device: str = "cpu"
    options: dict = field(default_factory=dict)  # extra PoolEvaluator keywords

    def __post_init__(self) -> None:
        if self.workers < 0:
            raise SmpqError(f"workers must be >= 0, got {self.workers}")
        cpus = os.cpu_count() or 1
        if self.address is None and self.workers > cpus:  # before Ray starts a local cluster
            raise SmpqError(f"--workers {self.workers} is more than this machine's {cpus} "
                            f"CPUs; use at most {cpus} (or --ray-address for a cluster)")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise SmpqError(f"device must be cpu, cuda or cuda:K, got {self.device!r}")

    @property
    def backend(self) -> str:
        return "ray" if self.workers or self.address else "local"

    def to_dict(self) -> dict:
        return {"backend": self.backend, "workers": self.workers, "address": self.address,
                "device": self.device}


def make_evaluator(task: ValueTask, config: EvaluatorConfig | None = None, *,
                   local_fn: ValueFn | None = None,
                   progress: Progress | None = None) -> Evaluator:
    """The evaluator `config` asks for; `local_fn` reuses a value function already built here
    (the local backend then builds nothing)."""
    cfg = config or EvaluatorConfig()
    if cfg.backend == "local":
        if local_fn is not None:
            return LocalEvaluator(fn=local_fn, progress=progress)
        return LocalEvaluator(task, device=cfg.device, progress=progress)
    workers = cfg.workers or None  # joining a cluster without a count: all of it
    from smpq.evaluator.raypool import RayEvaluator

    return RayEvaluator(task, workers=workers, address=cfg.address, device=cfg.device,
                        progress=progress, **cfg.options)
