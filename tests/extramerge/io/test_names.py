"""Issue 21 item 12 (names): a tensor named ``__metadata__`` (the key safetensors reserves for its header's
metadata) used to merge with exit 0 into a file no safetensors reader could load; an output name of 250
bytes failed with a 'File name too long' traceback once the merge was done (its staging name is longer),
and a name over 255 bytes too. Now: the first is one line, exit 2, nothing written; the second works;
the third is one line, exit 2, before anything is made."""

from __future__ import annotations

import pytest
import torch
from _ckpt_factory import make_safetensors_files
from safetensors.torch import load_file

from extramerge.cli import main
from extramerge.io import CheckpointError, TensorInfo, write_checkpoint


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_tensor_named_metadata_is_refused_in_one_line(tmp_path, capsys):
    files = []
    for step in (100, 200):
        p = tmp_path / f"step_{step:06d}.pt"
        torch.save({"w": torch.ones(3) * step, "__metadata__": torch.zeros(2)}, p)
        files.append(p)
    out = tmp_path / "out" / "merged.safetensors"
    rc, err = _cli(capsys, "merge", *files, "--method", "sma", "-o", out)
    assert rc == 2 and len(err) == 1 and "'__metadata__'" in err[0] and "safetensors reserves" in err[0], err
    assert not (tmp_path / "out").exists()
    assert _cli(capsys, "inspect", files[0])[0] == 2


def test_the_writer_refuses_the_name_too(tmp_path):
    infos = {"__metadata__": TensorInfo("__metadata__", (2,), torch.float32)}
    with pytest.raises(CheckpointError, match="'__metadata__': safetensors reserves this name"):
        write_checkpoint(tmp_path / "x.safetensors", [("__metadata__", torch.zeros(2))], infos=infos)
    assert list(tmp_path.iterdir()) == []


def test_an_output_name_of_250_bytes_works_and_one_over_255_is_refused_first(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=2)
    out = tmp_path / "new" / ("a" * 238 + ".safetensors")  # 250 bytes
    rc, err = _cli(capsys, "merge", *run, "--method", "sma", "-o", out, "--quiet")
    assert rc == 0, err
    assert set(load_file(out)) and sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, "a" * 238 + ".merge.json"]
    )
    too = tmp_path / "made" / ("b" * 250 + ".safetensors")
    rc, err = _cli(capsys, "merge", *run, "--method", "sma", "-o", too)
    assert rc == 2 and len(err) == 1 and "a file system allows 255" in err[0], err
    assert not (tmp_path / "made").exists()
