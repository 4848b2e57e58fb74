"""A hard link to a file outside a checkpoint folder is a regular file inside it: it is read, with one
warning naming it (docs/SECURITY.md, "What stays by design")."""

import os
import warnings
from pathlib import Path

import torch
from _ckpt_factory import make_hf_run

from extramerge.cli import main
from extramerge.io import open_checkpoint

NEEDLE = "hard links: its contents may be shared with a file outside the folder"


def _linked(tmp_path: Path) -> tuple[Path, Path]:
    """An HF folder whose model.safetensors is a hard link to a file outside it; (folder, that file)."""
    folder = make_hf_run(tmp_path / "run", n=1)[0]
    outside = tmp_path / "elsewhere" / "weights.safetensors"
    outside.parent.mkdir()
    (folder / "model.safetensors").rename(outside)
    os.link(outside, folder / "model.safetensors")
    return folder, outside


def _read_all(folder: Path) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # count every warning, not once per location
        ck = open_checkpoint(folder)
        for name in ck.infos:
            assert isinstance(ck.read(name), torch.Tensor)
    return [w for w in seen if NEEDLE in str(w.message)]


def test_a_hard_link_to_an_outside_file_is_read_with_one_warning(tmp_path, capsys):
    folder, _ = _linked(tmp_path)
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if NEEDLE in ln]
    assert len(lines) == 1, err
    assert lines[0] == (
        f"extramerge: warning: {folder / 'model.safetensors'}: has 2 hard links: its contents may be "
        "shared with a file outside the folder"
    )


def test_the_reader_warns_once_per_file_however_often_it_opens_it(tmp_path):
    folder, _ = _linked(tmp_path / "a")
    (w,) = _read_all(folder)  # the file is opened for the header and again for reads: one warning
    assert str(folder / "model.safetensors") in str(w.message) and w.category is UserWarning


def test_a_file_with_one_link_gives_no_warning(tmp_path, capsys):
    folder = make_hf_run(tmp_path / "run", n=1)[0]
    assert _read_all(folder) == []
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    assert "hard link" not in capsys.readouterr().err


def test_a_hard_linked_side_file_copied_into_an_output_warns(tmp_path):
    """Side files are copied through the descriptor ``open_regular`` checked (issue 21 items 4 and 14):
    the same one warning as any other file read."""
    import extramerge

    run = make_hf_run(tmp_path / "run", n=2)
    outside = tmp_path / "elsewhere.txt"
    outside.write_text("shared notes\n")
    os.link(outside, run[-1] / "notes.txt")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        extramerge.merge(run, method="sma", output=tmp_path / "out", progress=False)
    hits = [w for w in seen if NEEDLE in str(w.message) and "notes.txt" in str(w.message)]
    assert len(hits) >= 1 and (tmp_path / "out" / "notes.txt").read_text() == "shared notes\n"
