"""English Wikipedia text for causal LMs: the excerpt in gensim 4.4.0, split by article.

Source: `gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-
shortened.bz2` (a MediaWiki XML dump, 1.7 MB compressed), read from an installed gensim
package's folder (located with find_spec, gensim is never imported), from a gensim wheel file
(zip member), or from any such .bz2 / .xml dump path. No download, no gensim dependencies.

Protocol (fixed; figures depend on it, so compare methods only within it):
1. Pages: namespace 0 only; redirects (a <redirect> element or text starting #REDIRECT) are
   dropped; an article is kept when its cleaned text has at least MIN_WORDS words.
2. Markup (`strip_wikitext`, in this order): HTML comments; <ref>, <math>, <gallery> and
   similar elements with their content; templates {{...}} and tables {|...|} (innermost
   first, so nesting is handled); [[File:/Image:/Category:/Media:]] and interlanguage links
   dropped, other [[target|label]] -> label, [[target]] -> target; [url label] -> label; other
   tags dropped (their text kept); bold/italic quotes; sections titled See also, References,
   Notes, Further reading, External links, Bibliography, Sources, Footnotes, Citations dropped;
   headings kept as their text on a line; list markers, leftover table rows and magic words
   dropped; HTML entities decoded; runs of spaces and blank lines collapsed.
3. Splits are by ARTICLE, so no article leaks between them: bucket = int(sha256(title)[:8],
   16) % 100; buckets 0-39 calibration, 40-69 validation (what a search may look at), 70-99
   test (final figures only). Hashing the title keeps a page's split stable if pages change.
   On the gensim 4.4.0 file (206 pages, 106 articles kept; `wiki_summary`): calibration 55
   articles / 1.24 M chars / 278k SmolLM2 tokens, validation 19 / 0.57 M / 126k, test 32 /
   0.99 M / 221k. Float SmolLM2-135M (dequantized Q4_1): perplexity 20.48 on 16 evenly spread
   test blocks of 512 tokens.

Token blocks (`wiki_blocks`): the split's articles in file order, tokenized without special
tokens, joined by <eos>, cut into blocks; n_blocks takes blocks evenly spread over the stream.
User text (`calib_text_blocks`): a plain-text file (one document) or JSONL ({"text": ...} per
line, one document each) -> calibration blocks totalling calib_tokens tokens.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from smpq.errors import SmpqError
from smpq.fileio import parse_json

__all__ = [
    "GENSIM_INSTALL",
    "MIN_WORDS",
    "WIKI_FILE",
    "WIKI_MEMBER",
    "WIKI_SPLITS",
    "WIKI_SPLIT_BUCKETS",
    "Article",
    "calib_text_blocks",
    "read_text_documents",
    "strip_wikitext",
    "wiki_articles",
    "wiki_blocks",
    "wiki_corpus",
    "wiki_source",
    "wiki_split_of",
    "wiki_summary",
]

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MEMBER = f"gensim/test/test_data/{WIKI_FILE}"
GENSIM_INSTALL = "pip install --no-deps gensim==4.4.0"
WIKI_SPLITS = ("calibration", "validation", "test")
# Upper bucket bound (exclusive) of each split, in WIKI_SPLITS order: 40% / 30% / 30%.
WIKI_SPLIT_BUCKETS = {"calibration": 40, "validation": 70, "test": 100}
MIN_WORDS = 50

_DROP_ELEMENTS = ("ref", "math", "gallery", "timeline", "score", "syntaxhighlight", "source",
                  "imagemap", "chem", "hiero", "templatedata", "references")
_DROP_SECTIONS = frozenset({"see also", "references", "notes", "further reading", "external links",
                            "bibliography", "sources", "footnotes", "citations",
                            "notes and references", "references and notes"})
_DROP_LINK_PREFIXES = frozenset({"file", "image", "category", "media"})
_ELEMENT_RE = "|".join(_DROP_ELEMENTS)
_RE_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_RE_SELF_CLOSING = re.compile(rf"<(?:{_ELEMENT_RE})\b[^>]*/>", re.I)
_RE_ELEMENT = re.compile(rf"<({_ELEMENT_RE})\b[^>]*>.*?</\1\s*>", re.I | re.S)
_RE_TEMPLATE = re.compile(r"\{\{(?:(?!\{\{|\}\}).)*\}\}", re.S)
_RE_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\}).)*\|\}", re.S)
_RE_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_RE_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]*\s*([^\]]*)\]")
_RE_URL = re.compile(r"(?:https?|ftp)://\S+")
_RE_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_RE_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_RE_LANG = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*$")


def _innermost(pattern: re.Pattern, repl: Any, text: str) -> str:
    """Apply a non-nesting pattern until it stops matching (handles nesting inside-out)."""
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return new
        text = new


def _link(m: re.Match) -> str:
    target, _, label = m.group(1).partition("|")
    prefix, colon, _ = target.strip().lstrip(":").partition(":")
    if colon and (prefix.strip().lower() in _DROP_LINK_PREFIXES or _RE_LANG.match(prefix)):
        if not target.strip().startswith(":"):
            return ""
    text = label.rpartition("|")[2] if label else target.lstrip(":")
    return text.strip()


def _lines(text: str) -> Iterator[str]:
    """Headings as text, dropped sections skipped, list markers and table debris removed."""
    skip_level = 0
    for raw in text.split("\n"):
        line = raw.strip()
        head = _RE_HEADING.match(line)
        if head:
            level, title = len(head.group(1)), head.group(2).strip()
            if skip_level and level > skip_level:
                continue
            skip_level = level if title.lower() in _DROP_SECTIONS else 0
            if not skip_level:
                yield ""
                yield title
            continue
        if skip_level:
            continue
        if line.startswith(("|", "!", "{|", "|}")) or re.fullmatch(r"-{4,}", line):
            continue
        yield re.sub(r"^[*#:;]+\s*", "", line)


def strip_wikitext(text: str) -> str:
    """Plain text of an article's wikitext (the protocol in the module docstring)."""
    text = _RE_COMMENT.sub("", text)
    text = _RE_SELF_CLOSING.sub("", text)
    text = _innermost(_RE_ELEMENT, "", text)
    text = _innermost(_RE_TEMPLATE, "", text)
    text = _innermost(_RE_TABLE, "", text)
    text = _innermost(_RE_LINK, _link, text)
    text = _RE_EXTERNAL.sub(r"\1", text)
    text = _RE_URL.sub("", text)
    text = re.sub(r"<br\s*/?>", " ", text, flags=re.I)
    text = _RE_TAG.sub("", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"__[A-Z]+__", "", text)
    text = "\n".join(_lines(text))
    text = html.unescape(text).replace("\xa0", " ")
    text = re.sub(r"\(\s*[,;]?\s*\)", "", text)  # "()" left behind by removed templates
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" +([,.;:])", r"\1", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# -- reading the dump --------------------------------------------------------------------------


def wiki_source(source: str | os.PathLike | None = None) -> Path:
    """Path of the dump: given (a .bz2/.xml dump, a gensim wheel, a folder holding either), or
    found in the installed gensim package."""
    if source is None:
        spec = importlib.util.find_spec("gensim")
        locations = list(spec.submodule_search_locations or []) if spec else []
        path = Path(locations[0]) / "test" / "test_data" / WIKI_FILE if locations else None
        if path is None or not path.is_file():
            raise SmpqError(f"the Wikipedia excerpt needs gensim's test data: {GENSIM_INSTALL} "
                            "(or pass the gensim wheel file)")
        return path
    path = Path(source).expanduser()
    if path.is_dir():
        for candidate in (path / WIKI_FILE, path / "test" / "test_data" / WIKI_FILE,
                          path / WIKI_MEMBER):
            if candidate.is_file():
                return candidate
        raise SmpqError(f"no {WIKI_FILE} under {path}")
    if not path.is_file():
        raise SmpqError(f"Wikipedia source not found: {path}")
    return path


def _xml_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".whl" or zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                try:
                    data = zf.read(WIKI_MEMBER)
                except KeyError:
                    raise SmpqError(f"{path} holds no {WIKI_MEMBER}") from None
            return bz2.decompress(data)
        data = path.read_bytes()
        return bz2.decompress(data) if data[:3] == b"BZh" else data
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        raise SmpqError(f"cannot read the Wikipedia dump {path}: {exc}") from None


@dataclass(frozen=True)
class Article:
    """One main-namespace page: its title, cleaned text and split."""

    title: str
    text: str

    @property
    def split(self) -> str:
        return wiki_split_of(self.title)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _pages(xml: bytes) -> Iterator[tuple[str, str, bool]]:
    """(title, namespace, wikitext or None for redirects) of every <page>, in file order."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise SmpqError(f"the Wikipedia dump is not valid XML: {exc}") from None
    for page in (el for el in root if _local(el.tag) == "page"):
        fields = {_local(c.tag): c for c in page}
        title = (fields["title"].text or "") if "title" in fields else ""
        ns = (fields["ns"].text or "").strip() if "ns" in fields else "0"
        texts = [el for el in page.iter() if _local(el.tag) == "text"]
        text = (texts[-1].text or "") if texts else ""
        redirect = "redirect" in fields or text.lstrip().upper().startswith("#REDIRECT")
        yield title, ns, (None if redirect else text)


@functools.lru_cache(maxsize=4)
def _articles(path: str, mtime_ns: int) -> tuple[Article, ...]:
    out = []
    for title, ns, text in _pages(_xml_bytes(Path(path))):
        if ns != "0" or text is None:
            continue
        clean = strip_wikitext(text)
        if len(clean.split()) >= MIN_WORDS:
            out.append(Article(title=title, text=clean))
    if not out:
        raise SmpqError(f"the Wikipedia dump {path} holds no article of {MIN_WORDS}+ words")
    return tuple(out)


def wiki_articles(source: str | os.PathLike | None = None) -> list[Article]:
    """Every kept article of the dump in file order (cached per process)."""
    path = wiki_source(source).resolve()
    return list(_articles(str(path), path.stat().st_mtime_ns))


def wiki_split_of(title: str) -> str:
    """The split of an article from its title alone (see module docstring)."""
    bucket = int(hashlib.sha256(title.encode("utf-8")).hexdigest()[:8], 16) % 100
    return next(s for s in WIKI_SPLITS if bucket < WIKI_SPLIT_BUCKETS[s])


def wiki_corpus(source: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """{split: article texts in file order}."""
    out: dict[str, list[str]] = {s: [] for s in WIKI_SPLITS}
    for a in wiki_articles(source):
        out[a.split].append(a.text)
    return out


def wiki_summary(source: str | os.PathLike | None = None) -> dict[str, dict[str, int]]:
    """{split: {"articles", "chars"}} to document the splits."""
    return {s: {"articles": len(t), "chars": sum(map(len, t))}
            for s, t in wiki_corpus(source).items()}


def _check_split(split: str) -> None:
    if split not in WIKI_SPLITS:
        raise SmpqError(f"unknown split {split!r}; known: {', '.join(WIKI_SPLITS)}")


def _pick(blocks: torch.Tensor, n_blocks: int | None, seed: int | None) -> torch.Tensor:
    """n_blocks distinct rows drawn with numpy's default_rng(seed), kept in stream order."""
    if n_blocks is None:
        return blocks
    if not isinstance(n_blocks, int) or n_blocks < 1:
        raise SmpqError(f"n_blocks must be None or an integer >= 1, got {n_blocks!r}")
    if n_blocks > len(blocks):
        raise SmpqError(f"asked for {n_blocks} blocks but the texts give only {len(blocks)}")
    rows = np.sort(np.random.default_rng(seed).choice(len(blocks), n_blocks, replace=False))
    return blocks[torch.from_numpy(rows)]


def wiki_blocks(tokenizer: Any, split: str, block: int = 512, n_blocks: int | None = None,
                source: str | os.PathLike | None = None, seed: int | None = None) -> torch.Tensor:
    """LongTensor (N, block) of the split's articles (data.token_blocks: <eos>-joined).

    With n_blocks: evenly spread blocks when seed is None (the fixed default), else n_blocks
    distinct blocks drawn with default_rng(seed) (e.g. several calibration seeds)."""
    from smpq.transformer.data import token_blocks

    _check_split(split)
    texts = wiki_corpus(source)[split]
    if not texts:
        raise SmpqError(f"the Wikipedia split {split!r} has no articles")
    if seed is None:
        return token_blocks(texts, tokenizer, block=block, n_blocks=n_blocks)
    return _pick(token_blocks(texts, tokenizer, block=block), n_blocks, seed)


# -- user calibration text ---------------------------------------------------------------------


def read_text_documents(path: str | os.PathLike) -> list[str]:
    """Documents of a calibration file: JSONL (.jsonl/.ndjson, {"text": str} per non-blank
    line) or plain text (the whole file is one document)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SmpqError(f"calibration text file not found: {p}")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SmpqError(f"cannot read calibration text {p} as UTF-8: {exc}") from None
    if p.suffix.lower() not in (".jsonl", ".ndjson"):
        return [raw] if raw.strip() else []
    docs = []
    for i, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line, "it")  # nesting bounded, as policy files are
        except SmpqError as exc:
            raise SmpqError(f"{p}:{i}: not a JSON line ({exc})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise SmpqError(f'{p}:{i}: expected an object with a string "text" field')
        docs.append(obj["text"])
    return docs


def calib_text_blocks(path: str | os.PathLike, tokenizer: Any, calib_tokens: int,
                      block: int = 512) -> torch.Tensor:
    """LongTensor (calib_tokens // block, block) of calibration blocks from a user's file,
    evenly spread over its token stream (documents joined by <eos>)."""
    from smpq.transformer.data import token_blocks

    for name, value in (("calib_tokens", calib_tokens), ("block", block)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SmpqError(f"{name} must be an integer >= 1, got {value!r}")
    if calib_tokens < block:
        raise SmpqError(f"calib_tokens ({calib_tokens}) is less than one block of {block} tokens")
    docs = read_text_documents(path)
    n_blocks = calib_tokens // block
    if not docs:
        raise SmpqError(f"calibration text {path} is empty")
    try:
        return token_blocks(docs, tokenizer, block=block, n_blocks=n_blocks)
    except SmpqError:
        from smpq.transformer.data import _encode

        n = sum(len(_encode(tokenizer, d)) for d in docs)
        raise SmpqError(f"calibration text {path} gives {n} tokens; {calib_tokens} requested "
                        f"({n_blocks} blocks of {block})") from None
