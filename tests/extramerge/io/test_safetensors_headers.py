"""Issue 10 (C): a malformed safetensors header gives one CheckpointError naming the file and the field
(CLI: one line, exit 2), never a traceback; fuzzed with hypothesis."""

import json
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extramerge.cli import main
from extramerge.io import CheckpointError, open_checkpoint

GOOD = {"a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}, "b": {"dtype": "I64", "shape": [1],
        "data_offsets": [16, 24]}}  # fmt: skip


def _file(path: Path, header, data: bytes = b"\0" * 24, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _refused(capsys, path: Path, *needles: str) -> None:
    with pytest.raises(CheckpointError):
        open_checkpoint(path)
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extramerge: error: "), err
    assert str(path) in lines[0], err
    for n in needles:
        assert n in lines[0], (n, err)


def test_a_good_header_opens(tmp_path):
    with open_checkpoint(_file(tmp_path / "ok.safetensors", GOOD)) as ck:
        assert list(ck.infos) == ["a", "b"]


CASES = {
    "deep-nesting": (b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    "huge-number": (b'{"a": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 4]}}', "out of range"),
    "nan": (b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}', "non-finite"),
    "duplicate-key": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate"),
    "not-an-object": (b"[1, 2]", "not a JSON object"),
    "metadata-list": ({**GOOD, "__metadata__": [1, 2]}, "__metadata__"),
    "metadata-value": ({**GOOD, "__metadata__": {"format": 3}}, "__metadata__ field 'format'"),
    "wrong-dtype": ({**GOOD, "a": {**GOOD["a"], "dtype": "F33"}}, "tensor 'a': unsupported or invalid dtype"),
    "dtype-not-string": ({**GOOD, "a": {**GOOD["a"], "dtype": ["F32"]}}, "tensor 'a': unsupported"),
    "float-shape": ({**GOOD, "a": {**GOOD["a"], "shape": [2.0, 2]}}, "tensor 'a': invalid shape"),
    "bool-shape": ({**GOOD, "b": {**GOOD["b"], "shape": [True]}}, "tensor 'b': invalid shape"),
    "negative-shape": ({**GOOD, "a": {**GOOD["a"], "shape": [-2, -2]}}, "tensor 'a': invalid shape"),
    "offsets-one": ({**GOOD, "a": {**GOOD["a"], "data_offsets": [0]}}, "tensor 'a': invalid data_offsets"),
    "offsets-reversed": ({**GOOD, "a": {**GOOD["a"], "data_offsets": [16, 0]}}, "tensor 'a' has data"),
    "offsets-negative": ({**GOOD, "a": {**GOOD["a"], "data_offsets": [-16, 0]}}, "tensor 'a' has data"),
    "out-of-range": ({**GOOD, "b": {**GOOD["b"], "data_offsets": [24, 32]}}, "tensor 'b' ends at byte"),
    "overlap": ({**GOOD, "b": {**GOOD["b"], "data_offsets": [8, 16]}}, "tensor 'b': data_offsets overlap"),
    "extra-field": ({**GOOD, "a": {**GOOD["a"], "x": 1}}, "tensor 'a': corrupt header entry"),
    "entry-not-object": ({**GOOD, "a": 7}, "tensor 'a': corrupt header entry"),
    "not-utf8": (b'{"a\xff": 1}', "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_headers_give_one_line_naming_the_field(tmp_path, capsys, case):
    header, needle = CASES[case]
    _refused(capsys, _file(tmp_path / f"h-{case}.safetensors", header), needle)


def test_header_length_larger_than_the_file(tmp_path, capsys):
    _refused(capsys, _file(tmp_path / "long.safetensors", GOOD, length=10**12), "header length")
    _refused(capsys, _file(tmp_path / "max.safetensors", GOOD, length=2**64 - 1), "header length")
    (tmp_path / "short.safetensors").write_bytes(b"\1\0")
    _refused(capsys, tmp_path / "short.safetensors", "shorter than its 8-byte header")


def test_huge_integers_are_refused_not_crashing(tmp_path, capsys):
    big = "9" * 5000  # longer than Python's int-to-str limit
    raw = f'{{"a": {{"dtype": "F32", "shape": [{big}], "data_offsets": [0, 4]}}}}'.encode()
    _refused(capsys, _file(tmp_path / "big.safetensors", raw), "invalid JSON")
    raw = b'{"a": {"dtype": "F32", "shape": [100000000000000000000000000], "data_offsets": [0, 4]}}'
    _refused(capsys, _file(tmp_path / "big2.safetensors", raw), "tensor 'a' has data offsets")


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=20,
)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "I64", "BF16", "F33", "", 3]) | _json,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-4, 40), min_size=0, max_size=3) | _json,
    }
)
_header = st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__"]), _entry | _json, max_size=4)


def _open_or_refuse(path: Path) -> None:
    try:
        ck = open_checkpoint(path)
    except CheckpointError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    with ck:
        for name, info in ck.infos.items():  # what opened must be readable within the file
            assert ck.read(name, numpy=True).nbytes == info.nbytes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=_header, data=st.binary(max_size=40))
def test_fuzzed_headers_open_or_give_a_checkpoint_error(tmp_path, header, data):
    _open_or_refuse(_file(tmp_path / "fuzz.safetensors", header, data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200), length=st.integers(0, 300) | st.none())
def test_fuzzed_header_bytes_open_or_give_a_checkpoint_error(tmp_path, raw, length):
    _open_or_refuse(_file(tmp_path / "fuzz.safetensors", raw, b"\0" * 64, length))
