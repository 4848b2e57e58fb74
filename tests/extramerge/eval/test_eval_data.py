"""Issue 10 (C): data files for `extramerge eval --data` / `--cloze` are read as regular files, one
bounded line at a time, and any malformed line is one error line naming file:line (exit 2)."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from extramerge import eval as E
from extramerge.cli import main
from extramerge.io import CheckpointError


def _stub_model(folder: Path, names=("config.json", "model.safetensors", "tokenizer.json")) -> Path:
    """Enough of a model folder to pass the up-front folder check (the data fails before loading it): the
    weights a one-tensor safetensors file, since the check opens them as the merge reader does."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith(".safetensors"):
            save_file({"w": np.zeros(2, dtype=np.float32)}, str(folder / name))
        else:
            (folder / name).write_text("{}")
    return folder


@pytest.fixture
def model(tmp_path) -> Path:
    return _stub_model(tmp_path / "model")


def _eval_error(capsys, model: Path, *args) -> str:
    capsys.readouterr()
    rc = main(["eval", str(model), *map(str, args)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("extramerge: error: "), err
    return lines[0]


def test_dev_zero_and_a_fifo_are_refused(tmp_path, capsys, model):
    assert "character device" in _eval_error(capsys, model, "--data", "/dev/zero")
    fifo = tmp_path / "data.jsonl"
    os.mkfifo(fifo)
    assert "FIFO" in _eval_error(capsys, model, "--data", fifo)  # would block forever if opened plainly
    with pytest.raises(ValueError, match="FIFO"):
        E.load_texts(fifo)
    with pytest.raises(ValueError, match="FIFO"):
        E.load_cloze(fifo)


def test_deeply_nested_and_bad_lines_name_file_and_line(tmp_path, capsys, model):
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine"}\n' + "[" * 200_000 + "]" * 200_000 + "\n")
    line = _eval_error(capsys, model, "--data", data)
    assert f"{data}:2: invalid JSON (nested too deeply)" in line
    data.write_text('{"text": "fine"}\n\n{"text": 1e400}\n')
    assert f"{data}:3: invalid JSON" in _eval_error(capsys, model, "--data", data)
    data.write_bytes(b'{"text": "\xff\xfe secret"}\n')
    line = _eval_error(capsys, model, "--data", data)
    assert f"{data}:1: not UTF-8" in line and "secret" not in line


def test_a_huge_line_is_refused_reading_a_bounded_prefix(tmp_path, capsys, model):
    data = tmp_path / "huge.jsonl"
    with open(data, "wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB of zeros, sparse on disk: one line with no end
    t0 = time.perf_counter()
    line = _eval_error(capsys, model, "--data", data)
    assert f"{data}:1: line longer than" in line
    assert time.perf_counter() - t0 < 60


def test_cloze_files_get_the_same_treatment(tmp_path, monkeypatch):
    from extramerge.io import safety

    items = tmp_path / "items.jsonl"
    items.write_text(
        '{"context": "a", "target": "b", "candidates": ["b", "c"]}\n'
        + '{"a": ' * 50_000
        + "1"
        + "}" * 50_000
        + "\n"
    )
    with pytest.raises(CheckpointError, match=r"items\.jsonl:2: invalid JSON \(nested too deeply\)"):
        E.load_cloze(items)
    monkeypatch.setattr(safety, "LINE_LIMIT", 40)
    items.write_text('{"context": "a", "target": "b", "candidates": ["b", "c"], "pad": "xxxxxxxx"}\n')
    with pytest.raises(CheckpointError, match=r"items\.jsonl:1: line longer than 40 bytes"):
        E.load_cloze(items)


def test_merge_gram_files_are_validated(tmp_path, capsys):
    from _ckpt_factory import make_safetensors_files

    run = make_safetensors_files(tmp_path / "run", n=4)
    assert main(["analyze", *map(str, run), "-o", str(tmp_path / "rep"), "--quiet"]) == 0
    good = dict(np.load(tmp_path / "rep" / "gram.npz"))
    bad = tmp_path / "bad.npz"
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    cases = [
        (fifo, "FIFO"),
        ({k: v for k, v in good.items() if k != "per_tensor"}, "array is missing"),
        ({**good, "gram": good["gram"][:2]}, "inconsistent shapes"),
        ({**good, "gram": good["gram"] * np.nan}, "non-finite"),
        ({**good, "names": np.array([{"a": 1}], dtype=object)}, "not a gram.npz"),
        (b"PK\x03\x04 not a zip", "not a gram.npz"),
    ]
    for case, needle in cases:
        if isinstance(case, dict):
            np.savez(bad, **case)
        elif isinstance(case, bytes):
            bad.write_bytes(case)
        path = case if isinstance(case, Path) else bad
        capsys.readouterr()
        rc = main(
            ["merge", *map(str, run), "--method", "pc1", "--gram", str(path), "-o", str(tmp_path / "o")]
        )
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("extramerge: error: "), (needle, err)
        assert needle in err[0] and str(path) in err[0], (needle, err)


def test_eval_model_folders_and_data_folders_stay_inside(tmp_path, capsys, model):
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": 1}')
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello there"}\n')
    (model / "config.json").unlink()
    (model / "config.json").symlink_to(secret)
    assert "leaves the folder" in _eval_error(capsys, model, "--data", data)
    (model / "config.json").unlink()
    (model / "config.json").write_text("{}")
    os.mkfifo(model / "generation_config.json")
    assert "FIFO" in _eval_error(capsys, model, "--data", data)  # transformers would block opening it
    (model / "generation_config.json").unlink()
    # a tokenizer in the run folder (the model's parent) is held to the same rule
    run = tmp_path / "run"
    step = run / "step_000100"
    _stub_model(step, ("config.json", "model.safetensors"))
    (run / "tokenizer.json").symlink_to(secret)
    assert "leaves the folder" in _eval_error(capsys, step, "--data", data)
    # a data folder's .txt link leaving it
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("fine")
    (docs / "b.txt").symlink_to(secret)
    with pytest.raises(ValueError, match="leaves the folder"):
        E.load_texts(docs)


def test_fuzzed_jsonl_lines_load_or_give_one_line_errors(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
    value = st.recursive(
        leaf, lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=5), k, max_size=3)
    )
    line = st.builds(lambda v: json.dumps(v).encode(), value) | st.binary(max_size=60)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.lists(line, max_size=4))
    def check(lines):
        data = tmp_path / "fuzz.jsonl"
        data.write_bytes(b"\n".join(lines) + b"\n")
        for load in (E.load_texts, E.load_cloze):
            try:
                load(data)
            except ValueError as e:
                assert "\n" not in str(e) and str(data) in str(e)

    check()
