"""extramerge.lm.data: corpora, the deterministic split, prepared files; extramerge.lm.models: presets."""

import importlib.util
import json
import os

import numpy as np
import pytest

from extramerge.lm import data as lmdata
from extramerge.lm.tokenizer import EOS_ID, build_tokenizer, encode

WORDS = "river valley loss landscape checkpoint merge average extrapolate slope curvature noise".split()


def _write_corpus(folder, n_files=40, paras=6, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n\n".join(
            " ".join(rng.choice(WORDS, size=rng.integers(40, 90))) + f" ({i}.{j})" for j in range(paras)
        )
        (folder / f"doc_{i:03d}.txt").write_text(body + "\n")
    return folder


@pytest.fixture(scope="module")
def pydoc_dir(tmp_path_factory):
    return lmdata.prepare("pydoc", tmp_path_factory.mktemp("pydoc") / "data")


def test_pydoc_corpus_is_bundled():
    docs = lmdata.load_corpus("pydoc")
    assert len(docs) == 79
    assert 400_000 < sum(len(d.text.encode()) for d in docs) < 600_000


def test_split_is_deterministic(pydoc_dir, tmp_path):
    again = lmdata.prepare("pydoc", tmp_path / "again")
    for s in lmdata.SPLITS:
        assert np.array_equal(lmdata.load_split(pydoc_dir, s), lmdata.load_split(again, s))
    assert lmdata.load_meta(pydoc_dir)["content_hash"] == lmdata.load_meta(again)["content_hash"]


def test_split_does_not_depend_on_document_order():
    pieces = [p for d in lmdata.load_corpus("pydoc") for p in lmdata.split_pieces(d.text)]
    a = dict(zip(pieces, lmdata.assign_splits(pieces), strict=True))
    b = dict(zip(pieces[::-1], lmdata.assign_splits(pieces[::-1]), strict=True))
    assert a == b


def test_fractions_are_respected(pydoc_dir):
    meta = lmdata.load_meta(pydoc_dir)
    total = sum(meta["bytes"].values())
    for s, f in zip(lmdata.SPLITS, lmdata.DEFAULT_FRACTIONS, strict=True):
        assert abs(meta["bytes"][s] / total - f) < 0.01, (s, meta["bytes"])
    assert meta["tokens"]["train"] == meta["bytes"]["train"] + meta["pieces"]["train"]


def test_pieces_are_paragraph_packed():
    pieces = [p for d in lmdata.load_corpus("pydoc") for p in lmdata.split_pieces(d.text)]
    sizes = np.array([len(p.encode()) for p in pieces])
    assert sizes.max() <= lmdata.PIECE_MAX
    assert np.median(sizes) > 1024
    long = "\n\n".join(["word " * 300] * 10)  # paragraphs of 1.5 KB
    assert all(len(p.encode()) <= lmdata.PIECE_MAX for p in lmdata.split_pieces(long))
    one_line = "x" * 10_000
    assert "".join(lmdata.split_pieces(one_line)) == one_line


def test_eos_separates_pieces(pydoc_dir):
    train = lmdata.load_split(pydoc_dir, "train")
    assert train.dtype == np.uint16 and isinstance(train, np.memmap)
    assert train[-1] == EOS_ID
    assert int((train == EOS_ID).sum()) == lmdata.load_meta(pydoc_dir)["pieces"]["train"]
    assert train.max() <= EOS_ID


def test_heldout_jsonl_round_trips(pydoc_dir):
    for s in ("val", "test"):
        lines = (pydoc_dir / f"{s}.jsonl").read_text().splitlines()
        pieces = [json.loads(line)["text"] for line in lines]
        joined = np.concatenate([np.append(encode(p), np.uint16(EOS_ID)) for p in pieces])
        assert np.array_equal(joined, lmdata.load_split(pydoc_dir, s))
    tok = build_tokenizer()
    assert tok.decode(tok(pieces[0])["input_ids"]) == pieces[0]


def test_path_corpus_folder_file_and_jsonl(tmp_path):
    folder = _write_corpus(tmp_path / "corpus")
    (folder / "ignored.csv").write_text("a,b\n")
    docs = lmdata.load_corpus(str(folder))
    assert [d.name for d in docs] == [f"doc_{i:03d}.txt" for i in range(40)]
    out = lmdata.prepare(str(folder), tmp_path / "data", min_tokens=33)
    meta = lmdata.load_meta(out)
    assert meta["documents"] == 40 and meta["tokens"]["val"] > 33
    assert lmdata.load_corpus(str(folder / "doc_000.txt"))[0].text == (folder / "doc_000.txt").read_text()
    jl = tmp_path / "c.jsonl"
    jl.write_text('{"text": "first doc"}\n\n{"text": "second"}\n')
    assert [d.text for d in lmdata.load_corpus(str(jl))] == ["first doc", "second"]


def test_prepare_is_atomic_and_refuses_other_data(tmp_path):
    out = lmdata.prepare("pydoc", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left behind
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train.npy", "val.npy", "test.npy", "val.jsonl", "test.jsonl", "meta.json"]
    )
    folder = _write_corpus(tmp_path / "corpus", n_files=30)
    with pytest.raises(ValueError, match="different prepared dataset"):
        lmdata.prepare(str(folder), out)
    lmdata.prepare(str(folder), out, overwrite=True)
    assert lmdata.load_meta(out)["documents"] == 30


@pytest.mark.parametrize("make", ["missing", "empty_folder", "empty_file", "blank_file"])
def test_bad_corpus_names_the_path(tmp_path, make):
    path = tmp_path / "corpus"
    if make == "empty_folder":
        path.mkdir()
    elif make == "empty_file":
        path = tmp_path / "empty.txt"
        path.write_text("")
    elif make == "blank_file":
        path = tmp_path / "blank.txt"
        path.write_text("\n \n\t\n")
    with pytest.raises(ValueError, match=str(path)) as e:
        lmdata.prepare(str(path), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_split_too_small_for_a_batch(tmp_path):
    f = tmp_path / "small.txt"
    f.write_text("just a few words\n")
    with pytest.raises(ValueError, match=r"small\.txt.*fewer than one batch window"):
        lmdata.prepare(str(f), tmp_path / "out", min_tokens=129)


def test_gcide_missing_gives_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv(lmdata.GCIDE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match=r"get_gcide\.sh"):
        lmdata.load_corpus("gcide")


def test_gcide_reads_the_dictd_text(tmp_path, monkeypatch):
    text = "00-database-url\n   header\n\n Begin file 1 of 26:  Letter A\n\nAb \\Ab\\ n. a month.\n\xff"
    (tmp_path / "gcide.txt").write_bytes(text.encode("latin-1"))
    monkeypatch.setenv(lmdata.GCIDE_ENV, str(tmp_path))
    (doc,) = lmdata.load_corpus("gcide")
    assert doc.text.startswith(" Begin file 1") and "Ab \\Ab\\" in doc.text


def test_gensim_wiki_without_gensim(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a)
    )
    with pytest.raises(ValueError, match="pip install gensim"):
        lmdata.load_corpus("gensim-wiki")


def test_wiki_markup_is_stripped():
    src = (
        "{{Infobox|a={{b}}}}'''Anarchism''' is a [[political philosophy]] of "
        "[[self-governance|self-governed]]"
        " societies.<ref>cite</ref> See [http://x.org the site].\n[[Category:Things]]\n== History ==\n* item"
    )
    out = lmdata.strip_wiki_markup(src)
    assert (
        out
        == "Anarchism is a political philosophy of self-governed societies. See the site.\n\nHistory\n- item"
    )


@pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="gensim is not installed")
def test_gensim_wiki_corpus():
    docs = lmdata.load_corpus("gensim-wiki")
    assert len(docs) > 50
    text = "".join(d.text for d in docs)
    assert len(text) > 1_000_000 and text.count("{{") < 10 and text.count("[[") < 10


# ------------------------------------------------------------- issue 21 item 3: the corpus is untrusted input


def test_a_corpus_link_leaving_the_folder_is_refused_and_nothing_is_written(tmp_path, capsys):
    from extramerge.lm import cli as lmcli

    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-BYTES " * 50)
    corp = _write_corpus(tmp_path / "corp", n_files=8)
    (corp / "zz.txt").symlink_to(secret)
    with pytest.raises(ValueError, match=r"zz\.txt: a link that leaves the folder"):
        lmdata.load_corpus(str(corp))
    (corp / "zz.txt").unlink()
    (corp / "sub").mkdir()
    (corp / "sub" / "zz.md").symlink_to(secret)  # one folder down: the same rule
    with pytest.raises(ValueError, match=r"sub/zz\.md: a link that leaves the folder"):
        lmdata.prepare(str(corp), tmp_path / "data")
    assert not (tmp_path / "data").exists()
    run = tmp_path / "run"
    argv = ["-o", str(run), "--corpus", str(corp), "--size", "tiny", "--steps", "2", "--no-progress"]
    assert lmcli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "leaves the folder" in err and not run.exists(), err
    (corp / "sub" / "zz.md").unlink()
    (corp / "sub" / "inside.md").symlink_to(corp / "doc_000.txt")  # a link that stays inside is read
    assert "sub/inside.md" in [d.name for d in lmdata.load_corpus(str(corp))]


def test_corpus_special_files_huge_files_and_nested_lines_are_one_line_errors(tmp_path, monkeypatch):
    from extramerge.eval import data as eval_data

    corp = _write_corpus(tmp_path / "corp", n_files=3)
    (corp / "sub").mkdir()
    os.mkfifo(corp / "sub" / "pipe.txt")  # skipped silently before; never opened now
    with pytest.raises(ValueError, match=r"pipe\.txt: is a FIFO"):
        lmdata.load_corpus(str(corp))
    os.unlink(corp / "sub" / "pipe.txt")
    with pytest.raises(ValueError, match="character device"):
        lmdata.load_corpus("/dev/zero")  # a file given directly, read forever before
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": "fine"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(ValueError, match=r"deep\.jsonl:2: invalid JSON \(nested too deeply\)"):
        lmdata.load_corpus(str(deep))  # a RecursionError before
    monkeypatch.setattr(eval_data, "TEXT_LIMIT", 4096)
    with open(corp / "big.txt", "wb") as f:
        f.truncate(8192)  # sparse: refused by its size, not read
    with pytest.raises(ValueError, match=r"corp: its text files hold more than 4.00 KiB"):
        lmdata.load_corpus(str(corp))
    with pytest.raises(ValueError, match=r"big\.txt: larger than 4.00 KiB"):
        lmdata.load_corpus(str(corp / "big.txt"))
