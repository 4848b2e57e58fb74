"""Issue 21 (items 1, 2, 12): `extramerge eval` never runs a model folder's own code (not even after a 'y'
on stdin), checks the folder as the merge reader does (every file the index names, in subfolders too: no
link out, no FIFO), and a config.json nested too deeply is one line naming it."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from _ckpt_factory import byte_gpt2, save_model  # noqa: E402

from extramerge import eval as E  # noqa: E402
from extramerge.cli import main  # noqa: E402
from extramerge.lm.tokenizer import build_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
# a module that leaves a marker when it is imported, then passes for a config/model/tokenizer class
EVIL = """import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import GPT2Config as EvilConfig, GPT2LMHeadModel as EvilModel
from transformers import PreTrainedTokenizerFast as EvilTokenizer
"""


def _model(folder: Path, seed: int = 0) -> Path:
    return save_model(byte_gpt2(seed=seed), build_tokenizer(), folder)


def _data(tmp_path: Path) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the river and the valley " * 8}) + "\n")
    return data


def _edit(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _with_code(folder: Path, marker: Path, config: bool = True) -> Path:
    """The folder asks transformers to import its evil.py, with an unknown model_type in config.json: through
    config.json's auto_map, or (``config=False``) through tokenizer_config.json's."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    auto_map = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    _edit(folder / "config.json", model_type="evilmodel", **({"auto_map": auto_map} if config else {}))
    if not config:
        auto_map = {"AutoTokenizer": [None, "evil.EvilTokenizer"]}
        _edit(folder / "tokenizer_config.json", auto_map=auto_map, tokenizer_class="EvilTokenizer")
    return folder


def test_eval_never_runs_the_folders_code_even_after_a_yes(tmp_path):
    marker = tmp_path / "MARKER"
    model = _with_code(_model(tmp_path / "m"), marker)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "extramerge", "eval", str(model), "--data", str(_data(tmp_path)),
         "--cloze", "0", "--seq-len", "16", "--threads", "1"],
        input="y\ny\n", capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert not marker.exists(), "the model folder's own code ran"
    err = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(err) == 1 and err[0].startswith("extramerge: error: "), p.stderr
    assert str(model) in err[0] and "Do you wish to run" not in p.stdout + p.stderr


def test_the_tokenizers_auto_map_is_not_run_either(tmp_path, monkeypatch):
    marker = tmp_path / "MARKER"
    model = _with_code(_model(tmp_path / "m"), marker, config=False)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\ny\n"))  # the answer transformers would ask for
    with pytest.raises(ValueError) as e:
        E.load_model(model)
    assert not marker.exists(), "the model folder's own code ran"
    assert "cannot load the tokenizer" in str(e.value) and "\n" not in str(e.value)


def _sharded_in_subfolder(folder: Path) -> Path:
    """The model's weights as sub/m.safetensors, named by model.safetensors.index.json."""
    (folder / "sub").mkdir()
    os.rename(folder / "model.safetensors", folder / "sub" / "m.safetensors")
    from safetensors import safe_open

    with safe_open(folder / "sub" / "m.safetensors", "np") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "sub/m.safetensors")}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def test_eval_checks_every_file_the_index_names_as_the_merge_reader_does(tmp_path, capsys):
    model = _sharded_in_subfolder(_model(tmp_path / "m"))
    assert E.check_model_folder(model) == model  # a shard in a subfolder, inside: fine
    outside = _model(tmp_path / "other", seed=1) / "model.safetensors"
    shard = model / "sub" / "m.safetensors"
    shard.unlink()
    shard.symlink_to(outside)  # the outside weights would be loaded
    with pytest.raises(ValueError, match="leaves the checkpoint folder"):
        E.check_model_folder(model)
    capsys.readouterr()
    assert main(["inspect", str(model)]) == 2  # the reader refuses the same folder with the same words
    assert "leaves the checkpoint folder" in capsys.readouterr().err
    shard.unlink()
    os.mkfifo(shard)  # transformers would block opening it, and SIGTERM would not stop it
    with pytest.raises(ValueError, match="FIFO"):
        E.check_model_folder(model)


def test_eval_refuses_a_fifo_shard_in_one_line_without_hanging(tmp_path):
    model = _sharded_in_subfolder(_model(tmp_path / "m"))
    (model / "sub" / "m.safetensors").unlink()
    os.mkfifo(model / "sub" / "m.safetensors")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path]), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "extramerge", "eval", str(model), "--data", str(_data(tmp_path)),
         "--cloze", "0", "--seq-len", "16"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "FIFO" in err[0], p.stderr
    assert p.stdout == ""  # refused before any work


def test_a_deeply_nested_config_is_one_line_naming_it(tmp_path, capsys):
    data = _data(tmp_path)
    model = _model(tmp_path / "run" / "step_000100")
    (model / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    capsys.readouterr()
    assert main(["eval", str(model), "--data", str(data), "--cloze", "0", "--seq-len", "16"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == f"extramerge: error: {model / 'config.json'}: invalid JSON (nested too deeply)"
    assert out == ""  # before any work
    (model / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: not a JSON object"):
        E.check_model_folder(model)
