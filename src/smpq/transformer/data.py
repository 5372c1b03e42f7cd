"""Real text on every machine: the Python standard library's sources, in fixed disjoint splits.

Corpus: every `.py` file under `sysconfig.get_paths()["stdlib"]` in sorted order, minus
folders named site-packages, dist-packages, test, tests, idle_test, __pycache__ (third-party
code varies by machine; the test suites hold deliberately odd files). A file's text is its full
source (module docstring, comments and code), read as UTF-8 with universal newlines; files
that do not decode are skipped. CPython 3.11.7 gives 734 files, 12.1 MB.

Splits are by FILE, so no file leaks between them: a file's bucket is
int(sha256(relative posix path)[:8], 16) % 100; buckets 0-79 train, 80-84 calibration,
85-89 validation (what a search may look at), 90-99 test (final figures only). Hashing the
path (not a list index) keeps a file's split stable when other files come or go. On CPython
3.11.7: train 569 files / 9.70 MB, calibration 36 / 0.67 MB, validation 49 / 0.69 MB,
test 80 / 1.07 MB (see `corpus_summary`). Another Python version has other stdlib text, so
caches key on the text content, not on these numbers.

Retrieval task (encoders, e.g. all-MiniLM-L6-v2): every module/class/function docstring in a
split's files (ast order) with a summary paragraph of 4-40 words (the query) and at least 12
more words (the document, first 120 words kept); exact duplicates dropped; n pairs taken
evenly spread. Document i answers query i. On CPython 3.11.7 there are 1,947 such pairs in
train, 106 in calibration, 141 in validation and 249 in test; the default takes 64.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import re
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpq.errors import SmpqError

__all__ = [
    "EXCLUDED_DIRS",
    "SPLITS",
    "SPLIT_BUCKETS",
    "RetrievalTask",
    "corpus_summary",
    "docstring_pairs",
    "split_of",
    "stdlib_corpus",
    "stdlib_files",
    "stdlib_root",
    "token_blocks",
]

SPLITS = ("train", "calibration", "validation", "test")
# Upper bucket bound (exclusive) of each split, in SPLITS order: 80% / 5% / 5% / 10%.
SPLIT_BUCKETS = {"train": 80, "calibration": 85, "validation": 90, "test": 100}
EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
_QUERY_WORDS = (4, 40)
_MIN_DOC_WORDS = 12
_MAX_DOC_WORDS = 120


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def split_of(relpath: str) -> str:
    """The split of a file from its relative posix path alone (see module docstring)."""
    bucket = int(hashlib.sha256(relpath.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(s for s in SPLITS if bucket < SPLIT_BUCKETS[s])


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SmpqError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")


@functools.lru_cache(maxsize=4)
def _files(root: str) -> dict[str, tuple[tuple[str, str], ...]]:
    """{split: ((relpath, text), ...)} in sorted path order; cached per process."""
    base = Path(root)
    if not base.is_dir():
        raise SmpqError(f"standard library folder not found: {base}")
    rels = []
    for folder, dirs, names in os.walk(base):
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]  # prune: never walk site-packages
        rel_folder = Path(folder).relative_to(base)
        rels += [(rel_folder / n).as_posix() for n in names if n.endswith(".py")]
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for rel in sorted(rels):
        try:
            text = (base / rel).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        out[split_of(rel)].append((rel, text))
    return {s: tuple(v) for s, v in out.items()}


def _root_key(root: str | os.PathLike | None) -> str:
    return str(Path(root).expanduser().resolve()) if root is not None else str(stdlib_root())


def stdlib_files(root: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{split: sorted relative paths of its files}."""
    return {s: [p for p, _ in v] for s, v in _files(_root_key(root)).items()}


def stdlib_corpus(root: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{split: file texts in sorted path order}; `root` defaults to this Python's stdlib."""
    return {s: [t for _, t in v] for s, v in _files(_root_key(root)).items()}


def corpus_summary(root: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """{split: {"files", "chars", "bytes"}} to document the splits of this interpreter."""
    return {
        s: {
            "files": len(v),
            "chars": sum(len(t) for _, t in v),
            "bytes": sum(len(t.encode("utf-8")) for _, t in v),
        }
        for s, v in _files(_root_key(root)).items()
    }


def _encode(tokenizer: Any, text: str) -> np.ndarray:
    fast = getattr(tokenizer, "encode_array", None)  # smpq ByteTokenizer
    if fast is not None:
        return fast(text)
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    return np.asarray(ids, dtype=np.int64)


def _separator(tokenizer: Any) -> int | None:
    for attr in ("eos_token_id", "sep_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return None


def token_blocks(
    texts: Sequence[str], tokenizer: Any, block: int = 128, n_blocks: int | None = None
) -> torch.Tensor:
    """LongTensor (N, block): texts tokenized, joined by <eos> (else [SEP]), cut into blocks.

    No special tokens besides the separator; the tail shorter than a block is dropped. With
    n_blocks, that many blocks evenly spread over the whole stream (so a small budget still
    samples every region of the split, not just the alphabetically first files).
    """
    if not isinstance(block, int) or block < 1:
        raise SmpqError(f"block must be an integer >= 1, got {block!r}")
    if n_blocks is not None and (not isinstance(n_blocks, int) or n_blocks < 1):
        raise SmpqError(f"n_blocks must be None or an integer >= 1, got {n_blocks!r}")
    sep = _separator(tokenizer)
    tail = [np.array([sep], dtype=np.int64)] if sep is not None else []
    parts = [p for t in texts for p in (_encode(tokenizer, t), *tail)]
    stream = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    n_full = len(stream) // block
    if n_full == 0:
        raise SmpqError(f"the texts give {len(stream)} tokens, fewer than one block of {block}")
    blocks = stream[: n_full * block].reshape(n_full, block)
    if n_blocks is not None:
        if n_blocks > n_full:
            raise SmpqError(f"asked for {n_blocks} blocks but the texts give only {n_full}")
        blocks = blocks[(np.arange(n_blocks) * n_full) // n_blocks]
    return torch.from_numpy(np.ascontiguousarray(blocks)).long()


@dataclass(frozen=True)
class RetrievalTask:
    """Query i (a docstring's summary) is answered by document i (the rest of it)."""

    queries: tuple[str, ...]
    documents: tuple[str, ...]
    sources: tuple[str, ...]  # "relpath:line" of each pair

    def __len__(self) -> int:
        return len(self.queries)

    @property
    def texts(self) -> list[str]:
        """Queries then documents: a fixed text set for embedding similarity checks."""
        return [*self.queries, *self.documents]


def _words(text: str) -> list[str]:
    return text.split()


def _pairs_in(relpath: str, source: str) -> list[tuple[str, str, str]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, kinds):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc:
            continue
        head, *rest = re.split(r"\n\s*\n", doc.strip())
        query, body = _words(head), _words(" ".join(rest))
        if not (_QUERY_WORDS[0] <= len(query) <= _QUERY_WORDS[1]) or len(body) < _MIN_DOC_WORDS:
            continue
        line = getattr(node, "lineno", 1)
        out.append((" ".join(query), " ".join(body[:_MAX_DOC_WORDS]), f"{relpath}:{line}"))
    return out


@functools.lru_cache(maxsize=8)
def _all_pairs(root: str, split: str) -> tuple[tuple[str, str, str], ...]:
    seen_q: set[str] = set()
    seen_d: set[str] = set()
    pairs = []
    for relpath, text in _files(root)[split]:
        for q, d, src in _pairs_in(relpath, text):
            if q in seen_q or d in seen_d:
                continue
            seen_q.add(q)
            seen_d.add(d)
            pairs.append((q, d, src))
    return tuple(pairs)


def docstring_pairs(
    split: str = "validation", n: int | None = 64, root: str | os.PathLike | None = None
) -> RetrievalTask:
    """n (query, document) pairs from the split's docstrings, evenly spread; None = all."""
    _check_split(split)
    pairs = _all_pairs(_root_key(root), split)
    if n is not None:
        if not isinstance(n, int) or n < 1:
            raise SmpqError(f"n must be None or an integer >= 1, got {n!r}")
        if n > len(pairs):
            raise SmpqError(f"split {split!r} has only {len(pairs)} docstring pairs, asked {n}")
        pairs = tuple(pairs[(i * len(pairs)) // n] for i in range(n))
    if not pairs:
        raise SmpqError(f"split {split!r} has no docstring pairs")
    q, d, s = zip(*pairs, strict=True)
    return RetrievalTask(queries=q, documents=d, sources=s)
