"""Wikipedia text: markup stripping, article splits from a tiny dump, user calibration files."""

import bz2
import hashlib
import json
import zipfile

import numpy as np
import pytest
import torch

from smpq.errors import SmpqError
from smpq.transformer.wiki import (
    MIN_WORDS,
    WIKI_MEMBER,
    WIKI_SPLITS,
    calib_text_blocks,
    read_text_documents,
    strip_wikitext,
    wiki_articles,
    wiki_blocks,
    wiki_corpus,
    wiki_split_of,
)


class WordTokenizer:
    """Whitespace tokens numbered by first appearance; <eos> is id 0 (stands in for HF)."""

    eos_token_id = 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text, add_special_tokens=False, verbose=False):
        assert not add_special_tokens
        return [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]


@pytest.mark.parametrize(
    ("wikitext", "expected"),
    [
        ("'''Bold''' and ''italic'' text.", "Bold and italic text."),
        ("A [[Target page|label]] and [[Plain]].", "A label and Plain."),
        ("Cite.<ref name=x>{{cite web|url=http://a}}</ref> Next<ref name=y/>.", "Cite. Next."),
        ("Keep {{outer|{{inner}}}} this.", "Keep this."),
        ("[[File:X.jpg|thumb|A [[nested]] caption]]Text", "Text"),
        ("See [http://example.org the site] now", "See the site now"),
        ("x<!-- hidden -->y", "xy"),
        ("A&nbsp;B &ndash; C", "A B – C"),  # entities as the XML parser hands them over
        ("Body\n== History ==\nOld.\n== References ==\n* ref\n=== Sub ===\nx\n== Later ==\nyes",
         "Body\n\nHistory\nOld.\n\nLater\nyes"),
        ("* item one\n# item two", "item one\nitem two"),
        ("{|\n| cell || {|\n|inner\n|}\n|}\nAfter", "After"),
        ("[[Category:Things]][[de:Ding]]Word", "Word"),
        ("Word (  {{lang|x}} ) end", "Word end"),
    ],
)
def test_strip_wikitext(wikitext, expected):
    assert strip_wikitext(wikitext) == expected


def _words(i: int, n: int = MIN_WORDS) -> str:
    return " ".join(f"w{i}x{j}" for j in range(n))


def _page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
    red = f'<redirect title="{title}x" />' if redirect else ""
    return (f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}"
            f"<revision><id>2</id><text xml:space=\"preserve\">{text}</text></revision></page>")


@pytest.fixture
def dump(tmp_path):
    titles = [f"Article {i}" for i in range(40)]
    pages = [_page(t, f"'''{t}''' {_words(i)}") for i, t in enumerate(titles)]
    pages += [
        _page("Redirected", "#REDIRECT [[Article 1]]"),
        _page("Redirect element", _words(99), redirect=True),
        _page("Wikipedia:About", _words(98), ns=4),
        _page("Stub", "too short"),
    ]
    xml = ('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">'
           + "".join(pages) + "</mediawiki>")
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    return path, titles


def test_articles_keep_main_namespace_non_redirects_in_file_order(dump):
    path, titles = dump
    arts = wiki_articles(path)
    assert [a.title for a in arts] == titles
    assert arts[3].text == f"Article 3 {_words(3)}"


def test_splits_are_by_title_hash_disjoint_and_cover_everything(dump):
    path, titles = dump
    corpus = wiki_corpus(path)
    by_text = {f"{t} {_words(i)}": t for i, t in enumerate(titles)}
    seen = []
    for split, texts in corpus.items():
        for text in texts:
            title = by_text[text]
            bucket = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16) % 100
            lo, hi = {"calibration": (0, 40), "validation": (40, 70), "test": (70, 100)}[split]
            assert lo <= bucket < hi
            seen.append(title)
    assert sorted(seen) == sorted(titles)  # every article in exactly one split
    assert all(corpus[s] for s in WIKI_SPLITS)  # 40 titles fill all three splits


def test_reads_the_same_dump_from_a_wheel_or_a_package_folder(dump, tmp_path):
    path, titles = dump
    wheel = tmp_path / "gensim-4.4.0-cp311-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(WIKI_MEMBER, path.read_bytes())
    assert [a.title for a in wiki_articles(wheel)] == titles
    pkg = tmp_path / "site" / "gensim"
    (pkg / "test" / "test_data").mkdir(parents=True)
    (pkg / "test" / "test_data" / WIKI_MEMBER.rpartition("/")[2]).write_bytes(path.read_bytes())
    assert [a.title for a in wiki_articles(pkg)] == titles


@pytest.mark.parametrize("bad", ["missing.bz2", "empty_dir", "not_xml.bz2", "other.whl"])
def test_bad_sources_are_one_line_errors(tmp_path, bad):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "not_xml.bz2").write_bytes(bz2.compress(b"<mediawiki><page>"))
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as zf:
        zf.writestr("x.txt", "x")
    with pytest.raises(SmpqError) as exc:
        wiki_articles(tmp_path / bad)
    assert "\n" not in str(exc.value)


def test_wiki_blocks_are_the_split_stream_cut_into_blocks(dump):
    path, _ = dump
    tok = WordTokenizer()
    blocks = wiki_blocks(tok, "test", block=16, source=path)
    ref_tok = WordTokenizer()  # independent stream: words of each article then <eos>
    stream = []
    for text in wiki_corpus(path)["test"]:
        stream += [*ref_tok.encode(text), 0]
    n = len(stream) // 16
    assert torch.equal(blocks, torch.tensor(stream[: n * 16]).view(n, 16))
    with pytest.raises(SmpqError, match="unknown split"):
        wiki_blocks(tok, "train", source=path)


def test_seeded_blocks_are_distinct_rows_in_order_and_reproducible(dump):
    path, _ = dump
    full = wiki_blocks(WordTokenizer(), "calibration", block=4, source=path)
    picks = [wiki_blocks(WordTokenizer(), "calibration", 4, 5, path, seed=s) for s in (0, 0, 1)]
    assert torch.equal(picks[0], picks[1]) and not torch.equal(picks[0], picks[2])
    rows = {tuple(r.tolist()): i for i, r in enumerate(full)}
    for p in picks:
        idx = [rows[tuple(r.tolist())] for r in p]
        assert idx == sorted(set(idx)) and len(idx) == 5
    spread = wiki_blocks(WordTokenizer(), "calibration", 4, 5, path)
    assert torch.equal(spread, full[[(i * len(full)) // 5 for i in range(5)]])
    with pytest.raises(SmpqError, match="only"):
        wiki_blocks(WordTokenizer(), "calibration", 4, len(full) + 1, path, seed=0)


def test_calib_text_plain_and_jsonl(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text(" ".join(f"t{i}" for i in range(100)), encoding="utf-8")
    blocks = calib_text_blocks(plain, WordTokenizer(), calib_tokens=40, block=10)
    # 100 tokens = 10 blocks; 4 wanted, evenly spread: blocks 0, 2, 5, 7 -> ids 1 + 10*k + j
    want = torch.tensor([[1 + 10 * k + j for j in range(10)] for k in (0, 2, 5, 7)])
    assert torch.equal(blocks, want)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": f"a{i} b{i}"}) for i in range(6)) + "\n\n")
    assert read_text_documents(jl) == [f"a{i} b{i}" for i in range(6)]
    blocks = calib_text_blocks(jl, WordTokenizer(), calib_tokens=18, block=3)
    assert blocks.shape == (6, 3)
    assert np.all(blocks[:, 2].numpy() == 0)  # every document ends with <eos>


@pytest.mark.parametrize(
    ("content", "suffix", "tokens", "match"),
    [
        ("a b c", ".txt", 8, "gives 3 tokens; 8 requested"),
        ("", ".txt", 4, "empty"),
        ('{"text": "a"}\nnot json', ".jsonl", 4, r"c\.jsonl:2: not a JSON line"),
        ('{"txt": "a"}', ".jsonl", 4, 'string "text" field'),
        ("a b c d e", ".txt", 2, "less than one block"),
    ],
)
def test_calib_text_errors_are_one_line(tmp_path, content, suffix, tokens, match):
    path = tmp_path / f"c{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SmpqError, match=match) as exc:
        calib_text_blocks(path, WordTokenizer(), calib_tokens=tokens, block=4)
    assert "\n" not in str(exc.value)


def test_split_of_is_stable():
    assert wiki_split_of("Anarchism") == "validation"
    assert wiki_split_of("Autism") == "calibration"


def test_real_gensim_excerpt():
    import importlib.util

    if importlib.util.find_spec("gensim") is None:
        pytest.skip("gensim's test data not installed (pip install --no-deps gensim==4.4.0)")
    arts = wiki_articles()
    assert len(arts) == 106
    assert len({a.title for a in arts}) == len(arts)
    corpus = wiki_corpus()
    assert [len(corpus[s]) for s in WIKI_SPLITS] == [55, 19, 32]
    text = "\n".join(a.text for a in arts)
    for debris in ("{{", "}}", "<ref", "[[Category:", "'''", "==", "http"):
        assert debris not in text, debris
    assert arts[0].title == "Anarchism"
    assert arts[0].text.startswith("Anarchism is a political philosophy that advocates")
