"""Evaluators: memo and counts, chunked pools that lose workers, and Ray gives local's values."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from smpq.errors import SmpqError
from smpq.evaluator import (
    EvaluatorConfig,
    FunctionTask,
    LocalEvaluator,
    PoolEvaluator,
    WorkerLost,
    check_address,
    make_evaluator,
)

try:
    import ray
except ImportError:  # the ray extra is not installed
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray not installed (pip install 'smpq[ray]')")


def poly(rows: np.ndarray) -> np.ndarray:
    """A value that tells rows apart: sum_j (j + 1) * row_j^2 + 0.5 row_0 row_last."""
    rows = np.asarray(rows, dtype=float)
    w = np.arange(1, rows.shape[1] + 1)
    return (rows**2 * w).sum(axis=1) + 0.5 * rows[:, 0] * rows[:, -1]


def poly_one(row) -> float:  # the independent reference: one row, plain Python
    row = [float(x) for x in row]
    return sum((j + 1) * x * x for j, x in enumerate(row)) + 0.5 * row[0] * row[-1]


class Counting:
    def __init__(self):
        self.rows: list[tuple[int, ...]] = []
        self.dtypes: list[np.dtype] = []

    def __call__(self, rows):
        self.rows += [tuple(int(x) for x in r) for r in rows]
        self.dtypes.append(rows.dtype)
        return poly(rows)


# -- the local backend -----------------------------------------------------------------------

def test_local_memoises_by_row_and_counts_only_new_rows():
    fn = Counting()
    ticks = []
    ev = LocalEvaluator(fn=fn, progress=lambda d, t, w: ticks.append((d, t, w)))
    rows = np.array([[1, 2, 3], [0, 0, 1], [1, 2, 3], [2, 0, 0]])
    got = ev(rows)
    assert got.tolist() == [poly_one(r) for r in rows]
    assert fn.rows == [(1, 2, 3), (0, 0, 1), (2, 0, 0)]  # duplicates run once, in first order
    assert ev.calls == 3 and ev.batches == 1 and ticks == [(3, 3, 1)]
    again = ev(np.array([[2, 0, 0], [1, 1, 1]]))
    assert again.tolist() == [poly_one([2, 0, 0]), poly_one([1, 1, 1])]
    assert fn.rows[3:] == [(1, 1, 1)] and ev.calls == 4
    ev(np.array([[True, False, False]]))  # boolean coalitions key like 0/1 rows
    ev(np.array([[1, 0, 0]]))
    assert ev.calls == 5 and ev.forward_seconds >= 0
    assert fn.dtypes[-1] == np.dtype(bool) and fn.dtypes[0] == np.dtype(np.int64)  # as masks


def test_local_builds_a_task_once_and_rejects_bad_input():
    ev = make_evaluator(FunctionTask(poly))
    assert isinstance(ev, LocalEvaluator)
    assert ev([1, 2]).tolist() == [poly_one([1, 2])]  # one row may come as a 1-D array
    with pytest.raises(SmpqError, match="2-D"):
        ev(np.zeros((2, 2, 2)))
    with pytest.raises(SmpqError, match="one of them"):
        LocalEvaluator()
    short = LocalEvaluator(fn=lambda rows: np.zeros(len(rows) - 1))
    with pytest.raises(SmpqError, match="1 values for 2 rows"):
        short(np.array([[0], [1]]))


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": -1}, "workers"), ({"device": "tpu"}, "device")])
def test_config_validates(kwargs, match):
    with pytest.raises(SmpqError, match=match):
        EvaluatorConfig(**kwargs)
    assert EvaluatorConfig().backend == "local"
    assert EvaluatorConfig(workers=2).backend == "ray"
    assert EvaluatorConfig(address="h:1").to_dict()["backend"] == "ray"


# -- a pool that loses workers -----------------------------------------------------------

class FakePool:
    """Synchronous workers that each unpickle and build the task; `kill` lists (slot, nth
    submission to that slot) whose chunk dies mid-way, as a SIGKILLed process would."""

    def __init__(self, task, size: int, kill=()):
        self.blob, self.size, self.kill = pickle.dumps(task), size, set(kill)
        self.builds = [0] * size
        self.fns = [self._build(s) for s in range(size)]
        self.submits = [0] * size
        self.jobs: dict[int, tuple[int, np.ndarray, bool]] = {}
        self.log: list[tuple[int, int]] = []  # (slot, rows) of every submission
        self.closed = False

    def _build(self, slot):
        self.builds[slot] += 1
        return pickle.loads(self.blob).build("cpu")

    def submit(self, slot, rows):
        self.submits[slot] += 1
        handle = len(self.log)
        self.log.append((slot, len(rows)))
        self.jobs[handle] = (slot, rows.copy(), (slot, self.submits[slot]) in self.kill)
        return handle

    def wait(self, handles):
        h = handles[-1]  # finish the newest first: chunks complete out of order
        slot, rows, dies = self.jobs.pop(h)
        if dies:
            self.fns[slot] = None
            raise WorkerLost(h)
        assert self.fns[slot] is not None, "a dead worker was given work"
        return h, (self.fns[slot](rows), 0.01 * len(rows))

    def replace(self, slot):
        self.fns[slot] = self._build(slot)

    def close(self):
        self.closed = True


@pytest.mark.parametrize("workers, n", [(1, 5), (2, 7), (3, 16)])
def test_pool_reassembles_chunks_in_submission_order(workers, n):
    rng = np.random.default_rng(workers)
    rows = rng.integers(0, 5, size=(n, 4))
    pool = FakePool(FunctionTask(poly), workers)
    with PoolEvaluator(pool) as ev:
        got = ev(rows)
    assert pool.closed
    assert got.tolist() == [poly_one(r) for r in rows]
    distinct = len({tuple(r) for r in rows.tolist()})
    assert ev.calls == distinct and sum(k for _, k in pool.log) == distinct
    assert ev.forward_seconds == pytest.approx(0.01 * distinct)


def test_a_worker_lost_mid_batch_is_replaced_and_its_chunk_rerun():
    rows = np.random.default_rng(0).integers(0, 9, size=(12, 3))
    pool = FakePool(FunctionTask(poly), 2, kill={(1, 1), (1, 3)})
    ticks = []
    ev = PoolEvaluator(pool, progress=lambda d, t, w: ticks.append((d, t, w)))
    got = ev(rows)
    assert got.tolist() == [poly_one(r) for r in rows]  # identical values, in order
    assert ev.replaced == 2 and pool.builds == [1, 3]  # each lost worker rebuilt the task
    assert sum(k for _, k in pool.log) == 12 + 3 + 3  # two chunks of 3 ran twice
    assert ev.calls == 12 and ticks[-1] == (12, 12, 2)


def test_a_chunk_that_keeps_losing_workers_gives_up_with_one_line():
    pool = FakePool(FunctionTask(poly), 1, kill={(0, k) for k in range(1, 10)})
    ev = PoolEvaluator(pool, max_retries=2)
    with pytest.raises(SmpqError, match="lost its worker 3 times"):
        ev(np.eye(3, dtype=int))


def boom(rows):
    raise SmpqError("bad policy")


def test_errors_of_the_value_function_are_not_retried():
    pool = FakePool(FunctionTask(boom), 2)
    with pytest.raises(SmpqError, match="bad policy"):
        PoolEvaluator(pool)(np.eye(2, dtype=int))
    assert pool.builds == [1, 1]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = s.getsockname()[1]
    s.close()
    return port


def test_an_address_that_does_not_answer_is_one_line():
    port = _closed_port()
    with pytest.raises(SmpqError, match=f"no Ray cluster answers at 127.0.0.1:{port}"):
        check_address(f"127.0.0.1:{port}", timeout=2)
    with pytest.raises(SmpqError, match="HOST:PORT"):
        check_address("nowhere")


def test_cli_unreachable_ray_address_exits_2_with_one_line(tmp_path):
    port = _closed_port()
    proc = subprocess.run(
        [sys.executable, "-m", "smpq.cli", "search", "--ray-address", f"127.0.0.1:{port}",
         "--out", str(tmp_path / "s"), "--cache", str(tmp_path / "c")],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "error" in lines[0]
    assert not (tmp_path / "c").exists()  # failed before any training


# -- the digits supernet: every backend gives the same search ------------------------------

@pytest.fixture(scope="module")
def digits():
    from smpq.cnn.data import get_splits
    from smpq.cnn.models import build_model
    from smpq.cnn.train import TrainConfig, train
    from smpq.cost import trace_costs

    splits = get_splits("digits")
    model = build_model("mlp", splits.input_shape, splits.num_classes, seed=0, hidden=(32, 16))
    train(model, splits.train, TrainConfig(epochs=2, seed=0))
    return model.eval(), splits, trace_costs(model, splits.val[0][0][None])


def _search(digits, out, method="shapley-loop", **options):
    from smpq.cnn.search import SearchConfig
    from smpq.compare import run_method
    from smpq.cost import Budget

    model, splits, cost = digits
    cfg = SearchConfig(w_bits=(2, 4, 8), a_bits=(4, 8), seed=3)
    opts = {"n_evaluations": 24, "top_k": 3, "val_samples": 150, "out": out, **options}
    if method != "shapley-loop":
        opts = {k: v for k, v in opts.items() if k not in ("top_k", "out")}
    res, _ = run_method(method, model, splits, cost, Budget.parse("bitops=uniform:4/6"),
                        {}, cfg, **opts)
    return res


def _state(out):
    st = json.loads((out / "engine_state.json").read_text())
    st.pop("seconds")  # wall time: the one field that may differ
    return st


@pytest.mark.parametrize("method", ["shapley-loop", "random"])
def test_a_pool_of_pickled_workers_gives_the_local_search(digits, tmp_path, method):
    """Workers that rebuilt the task from its pickle, one lost mid-search: same result."""
    local = _search(digits, tmp_path / "local", method)
    pools = []

    def backend(task):
        pools.append(FakePool(task, 2, kill={(1, 1)}))
        return PoolEvaluator(pools[-1])

    pooled = _search(digits, tmp_path / "pool", method, backend=backend)
    assert pooled.policy.layers == local.policy.layers
    assert pooled.info["best_value"] == local.info["best_value"]
    assert pooled.evaluations == local.evaluations > 0
    assert pools[0].closed and pools[0].builds == [1, 2]
    if method == "shapley-loop":
        assert _state(tmp_path / "pool") == _state(tmp_path / "local")


class DriverKilled(Exception):
    pass


def test_a_search_killed_on_a_pool_resumes_locally_to_the_same_state(digits, tmp_path):
    """The checkpoint does not depend on the backend: kill the driver mid-search on a pool,
    resume on the local backend, and land on the uninterrupted run's policy and state."""
    whole = _search(digits, tmp_path / "whole")

    class Dying(PoolEvaluator):
        def _run(self, rows):
            if self.batches == 3:
                raise DriverKilled
            return super()._run(rows)

    with pytest.raises(DriverKilled):
        _search(digits, tmp_path / "cut", backend=lambda task: Dying(FakePool(task, 2)))
    cut = json.loads((tmp_path / "cut" / "engine_state.json").read_text())
    assert 0 < len(cut["values"]) < whole.evaluations
    resumed = _search(digits, tmp_path / "cut", resume=True)
    assert resumed.policy.layers == whole.policy.layers
    assert _state(tmp_path / "cut") == _state(tmp_path / "whole")


# -- Ray --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@needs_ray
def test_ray_two_workers_give_the_local_values_on_digits(digits, tmp_path, ray_cluster):
    local = _search(digits, tmp_path / "local")
    remote = _search(digits, tmp_path / "ray", backend=EvaluatorConfig(workers=2))
    assert remote.policy.layers == local.policy.layers
    assert _state(tmp_path / "ray") == _state(tmp_path / "local")
    assert remote.evaluations == local.evaluations == len(_state(tmp_path / "ray")["values"])


@needs_ray
def test_ray_oracle_table_equals_the_local_one(digits, ray_cluster):
    local = _search(digits, None, "oracle")
    remote = _search(digits, None, "oracle", workers=2)
    assert remote.info["table"] == local.info["table"]
    assert remote.evaluations == local.evaluations == local.info["n_policies"]


@needs_ray
def test_killing_a_ray_actor_mid_batch_still_gives_the_same_policy(digits, tmp_path,
                                                                   ray_cluster):
    from smpq.evaluator import RayEvaluator

    local = _search(digits, tmp_path / "local")
    made = []

    def killer(done, planned, workers):
        ev = made[0]
        if not ev.killed and done < planned:  # a chunk is done, others are still queued
            os.kill(ev.pids[1], signal.SIGKILL)
            ev.killed = True

    def backend(task):
        ev = RayEvaluator(task, workers=2, progress=killer, chunks_per_worker=4)
        ev.killed, ev.pids = False, [ev.pool.pid(s) for s in range(2)]
        made.append(ev)
        return ev

    remote = _search(digits, tmp_path / "ray", backend=backend)
    assert made[0].killed and made[0].replaced >= 1
    assert remote.policy.layers == local.policy.layers
    assert _state(tmp_path / "ray") == _state(tmp_path / "local")


# -- the tiny LM: the progressive game's value on every backend ----------------------------

@pytest.fixture(scope="module")
def lm_task(tmp_path_factory):
    from smpq.transformer.data import stdlib_corpus
    from smpq.transformer.run import RunSettings
    from smpq.transformer.tasks import SessionTask
    from smpq.transformer.tiny_lm import TinyLMConfig, train_tiny_lm

    root = tmp_path_factory.mktemp("lm")
    cfg = TinyLMConfig(hidden=32, layers=1, heads=2, intermediate=64, context=16, steps=30,
                       batch_size=8, warmup=4, lr=1e-2)
    folder = train_tiny_lm(cfg, stdlib_corpus()["calibration"][:3], root / "cache")
    settings = RunSettings(block=32, calib_blocks=4, val_blocks=2, test_blocks=2, batch_size=4,
                           cache_dir=str(root / "cache"))
    task = SessionTask(str(folder), out=str(root / "run"), candidates="int2g32,int4g32,int8g32",
                       settings=settings)
    session = task.session()  # quantizes the candidates once; workers read the cache
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 3, size=(10, len(session.groups)))
    return task, session, rows


def test_lm_task_values_are_the_progressive_games(lm_task):
    task, session, rows = lm_task
    game = session.game()
    want = [game.value(tuple(r)) for r in rows.tolist()]
    session.swapper.restore()
    got = LocalEvaluator(task)(rows)
    assert got.tolist() == want and len(set(want)) > 1


@needs_ray
def test_ray_two_workers_give_the_local_values_on_the_tiny_lm(lm_task, ray_cluster):
    task, _, rows = lm_task
    local = LocalEvaluator(task)(rows)
    with make_evaluator(task, EvaluatorConfig(workers=2)) as ev:
        remote = ev(rows)
        assert ev.workers == 2 and ev.calls == len({tuple(r) for r in rows.tolist()})
    assert remote.tolist() == local.tolist()


def test_ptq_session_shapley_on_a_worker_pool_equals_the_local_one(lm_task):
    from smpq.transformer.mixed import MixedConfig
    from smpq.transformer.run import PTQSession

    task, _, _ = lm_task
    cfg = MixedConfig(permutations=2, min_permutations=2, tolerance=None)
    pools = []

    def backend(t):
        pools.append(FakePool(t, 2, kill={(0, 1)}))
        return PoolEvaluator(pools[-1])

    runs = {}
    for label, scale in (("local", None), ("pool", backend)):
        s = PTQSession(task.model, candidates=task.candidates, settings=task.settings,
                       out=task.out, scale=scale).prepare()
        result, game, cost = s.shapley(cfg)
        runs[label] = (result.estimate.tolist(), game.memo, cost["forward_passes"])
    assert runs["pool"] == runs["local"]
    assert pools[0].closed and pools[0].builds == [2, 1] and sum(k for _, k in pools[0].log) > 0


def test_the_evaluator_is_core_it_imports_no_model_family():
    """smpq.evaluator sits in the core: numpy, the standard library, smpq.errors (and ray,
    lazily); a worker's model code comes in through the task it unpickles."""
    import ast
    from pathlib import Path

    import smpq.evaluator

    found = set()
    for path in Path(smpq.evaluator.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                found.add(node.module if top == "smpq" else top)
    smpq_deps = {m for m in found if m.startswith("smpq")}
    assert smpq_deps <= {"smpq.errors", "smpq.evaluator", "smpq.evaluator.base",
                         "smpq.evaluator.raypool"}
    assert "smpq.errors" in smpq_deps and "torch" not in found and "ray" in found
