"""Value evaluations, one process or many: submit a batch of policies, get their values back.

Every allocation method spends its time in value evaluations (one forward pass over a value
split per policy or coalition). Strategies hand batches of rows (ints or bools: a policy's
choice per unit, a coalition's mask) to an `Evaluator`; it memoises values by row, counts the
rows it really evaluated and the seconds spent inside the value function, and reports progress.
What a value is comes from a picklable *task* (`ValueTask`): `task.build(device)` returns the
value function, so each worker builds it once (loads the model, the candidate cache) and then
only evaluates.

| backend          | where values are computed                         | needs            |
|------------------|---------------------------------------------------|------------------|
| `LocalEvaluator` | this process (the default, today's behaviour)     | nothing          |
| `PoolEvaluator`  | a `WorkerPool`: chunks of a batch, one per worker | a pool           |
| `RayEvaluator`   | Ray actors (`workers=N` local cluster, `address`) | `smpq[ray]`      |

Results do not depend on the backend: the driver draws everything random, workers only
evaluate rows, and values are reassembled in submission order. A worker lost mid-batch is
replaced and its chunk re-run (`max_retries` times per chunk).
"""

from smpq.evaluator.base import (
    BACKENDS,
    Evaluator,
    EvaluatorConfig,
    FunctionTask,
    LocalEvaluator,
    PoolEvaluator,
    ValueFn,
    ValueTask,
    WorkerLost,
    WorkerPool,
    make_evaluator,
)
from smpq.evaluator.raypool import RayEvaluator, check_address

__all__ = [
    "BACKENDS",
    "Evaluator",
    "EvaluatorConfig",
    "FunctionTask",
    "LocalEvaluator",
    "PoolEvaluator",
    "RayEvaluator",
    "ValueFn",
    "ValueTask",
    "WorkerLost",
    "WorkerPool",
    "check_address",
    "make_evaluator",
]
