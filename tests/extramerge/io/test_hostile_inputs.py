"""Issue 10 (A): nothing outside a checkpoint is read, only regular files are read, one checkpoint is not
taken twice, and messages do not echo a file's bytes. Every refusal is one line and exit 2 in the CLI."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _ckpt_factory import make_hf_run, make_safetensors_files

from extramerge.cli import main
from extramerge.io import CheckpointError, load_checkpoints, open_checkpoint


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what set-up printed
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    return rc, err


def _one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("extramerge: error: "), err
    for n in needles:
        assert n in lines[0], (n, err)


@pytest.fixture
def sharded(tmp_path) -> Path:
    return make_hf_run(tmp_path / "run", n=1, fmt="sharded")[0]


def _index(folder: Path) -> tuple[Path, dict]:
    p = folder / "model.safetensors.index.json"
    return p, json.loads(p.read_text())


def _retarget(folder: Path, shard_name) -> None:
    """Point every tensor of the first shard at ``shard_name`` in the index."""
    p, doc = _index(folder)
    first = sorted(set(doc["weight_map"].values()))[0]
    doc["weight_map"] = {t: (shard_name if f == first else f) for t, f in doc["weight_map"].items()}
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "nested-dotdot"])
def test_index_shard_names_outside_the_folder_are_refused(sharded, tmp_path, capsys, kind):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(sorted(sharded.glob("model-*.safetensors"))[0], outside)
    name = {"dotdot": "../../elsewhere.safetensors", "absolute": str(outside), "nested-dotdot": "a/../../x"}
    _retarget(sharded, name[kind])
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        open_checkpoint(sharded)
    _one_line_error(*_cli(capsys, "inspect", sharded), "model.safetensors.index.json")


@pytest.mark.parametrize("bad", [3, None, ["a"], {"x": 1}, ""])
def test_index_shard_names_that_are_not_strings_are_refused(sharded, capsys, bad):
    _retarget(sharded, bad)
    with pytest.raises(CheckpointError, match="index"):
        open_checkpoint(sharded)
    _one_line_error(*_cli(capsys, "inspect", sharded), "index")


def test_index_shard_link_leaving_the_folder_is_refused(sharded, tmp_path, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        open_checkpoint(sharded)
    _one_line_error(*_cli(capsys, "inspect", sharded), "leaves the checkpoint folder")


def test_pytorch_bin_index_names_are_checked_too(tmp_path, capsys):
    folder = make_hf_run(tmp_path / "run", n=1, fmt="sharded-bin")[0]
    p = folder / "pytorch_model.bin.index.json"
    doc = json.loads(p.read_text())
    doc["weight_map"] = {t: "/etc/passwd" for t in doc["weight_map"]}
    p.write_text(json.dumps(doc))
    _one_line_error(*_cli(capsys, "inspect", folder), "outside the checkpoint folder")


def test_side_file_link_leaving_the_folder_is_refused(tmp_path, capsys):
    folder = make_hf_run(tmp_path / "run", n=1)[0]
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    (folder / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        open_checkpoint(folder)
    rc, err = _cli(capsys, "merge", folder, "--method", "sma", "-o", tmp_path / "out")
    _one_line_error(rc, err, "tokenizer.json", "leaves the checkpoint folder")
    assert not (tmp_path / "out").exists() and "top secret" not in err


def test_config_link_leaving_the_folder_is_refused(tmp_path, capsys):
    folder = make_hf_run(tmp_path / "run", n=1)[0]
    real = tmp_path / "config-elsewhere.json"
    shutil.move(folder / "config.json", real)
    (folder / "config.json").symlink_to(real)
    _one_line_error(*_cli(capsys, "inspect", folder), "config.json", "leaves the checkpoint folder")


def test_side_file_link_inside_the_folder_is_fine(tmp_path):
    folder = make_hf_run(tmp_path / "run", n=1)[0]
    (folder / "notes.txt").write_text("hello")
    (folder / "README.md").symlink_to("notes.txt")
    with open_checkpoint(folder) as ck:
        assert ck.infos


def test_single_weight_file_link_leaving_a_folder_is_refused(tmp_path, capsys):
    src = make_safetensors_files(tmp_path / "src", n=1)[0]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "weights.safetensors").symlink_to(src)
    _one_line_error(*_cli(capsys, "inspect", folder), "leaves the checkpoint folder")
    with open_checkpoint(src) as ck:  # the file itself, named by the user, is fine
        assert ck.infos


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", ["x.safetensors", "x.pt"])
def test_a_fifo_checkpoint_is_refused_without_blocking(tmp_path, name):
    fifo = _fifo(tmp_path / name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "extramerge", "inspect", str(fifo)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)  # would hang on open
    _one_line_error(p.returncode, p.stderr, "FIFO", "not a regular file")


def test_a_fifo_shard_in_an_index_is_refused(sharded, capsys):
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.unlink()
    _fifo(shard)
    _one_line_error(*_cli(capsys, "inspect", sharded), "FIFO")


def test_a_device_is_refused(tmp_path, capsys):
    link = tmp_path / "null.safetensors"
    link.symlink_to("/dev/null")
    _one_line_error(*_cli(capsys, "inspect", link), "character device")


def test_the_same_checkpoint_twice_is_refused(tmp_path, capsys):
    a, b = make_safetensors_files(tmp_path / "run", n=2)
    alias = tmp_path / "alias.safetensors"
    os.link(a, alias)  # another name, same inode
    for pair in ((a, a), (a, alias), (a, tmp_path / "run" / ".." / "run" / a.name)):
        with pytest.raises(CheckpointError, match="given twice"):
            load_checkpoints(list(pair))
        _one_line_error(*_cli(capsys, "inspect", *pair), "given twice")
    rc, err = _cli(capsys, "merge", a, b, a, "--method", "sma", "-o", tmp_path / "out.safetensors")
    _one_line_error(rc, err, "given twice")


def test_messages_do_not_echo_file_bytes(sharded, capsys):
    p, doc = _index(sharded)
    evil = "\x1b[31mEVIL\x07" + "A" * 500
    doc["weight_map"][evil] = sorted(set(doc["weight_map"].values()))[0]
    p.write_text(json.dumps(doc))
    rc, err = _cli(capsys, "inspect", sharded)
    _one_line_error(rc, err, "missing from")
    assert "\x1b" not in err and "\x07" not in err and "A" * 100 not in err
    p.write_bytes(b'{"weight_map": \xff\xfe secret}')
    rc, err = _cli(capsys, "inspect", sharded)
    _one_line_error(rc, err, "not UTF-8")
    assert "secret" not in err


def test_a_run_folder_entry_linking_outside_the_run_is_refused(tmp_path, capsys):
    run = make_safetensors_files(tmp_path / "run", n=3)
    elsewhere = make_safetensors_files(tmp_path / "elsewhere", n=1, steps=[400])[0]
    (tmp_path / "run" / "step_000400.safetensors").symlink_to(elsewhere)
    _one_line_error(*_cli(capsys, "inspect", tmp_path / "run"), "leaves the checkpoint folder")
    folder = make_hf_run(tmp_path / "hf", n=1, steps=[500])[0]
    (tmp_path / "run" / "step_000400.safetensors").unlink()
    (tmp_path / "run" / "step_000500").symlink_to(folder)
    _one_line_error(*_cli(capsys, "inspect", tmp_path / "run"), "leaves the checkpoint folder")
    (tmp_path / "run" / "step_000500").unlink()
    (tmp_path / "run" / "step_000400.safetensors").symlink_to(run[0].name)  # a link inside the run: fine
    with pytest.raises(CheckpointError, match="given twice"):
        load_checkpoints([tmp_path / "run"])


def test_torch_file_messages_do_not_echo_control_bytes(tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("\x1b[2Jgotcha",))

    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": Evil()}, f, protocol=2)
    rc, err = _cli(capsys, "inspect", p)
    _one_line_error(rc, err, "evil.pt")
    assert "\x1b" not in err and "gotcha" not in err


def _hub_layout(tmp_path: Path, src: Path) -> Path:
    """A huggingface_hub cache entry for src's files: blobs/ plus snapshots/<rev>/ of links into it."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"blob-{f.name}"
        shutil.copy(f, blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    return snap


def test_hub_snapshots_may_link_into_their_cache_but_not_beyond(tmp_path, monkeypatch):
    import huggingface_hub

    src = make_hf_run(tmp_path / "run", n=1)[0]
    snap = _hub_layout(tmp_path, src)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(snap))
    (ck,) = load_checkpoints(["org/tiny"])
    assert ck.infos and ck.root == snap.parents[1]
    ck.close()
    secret = tmp_path / "secret.txt"
    secret.write_text("x")
    (snap / "tokenizer.json").symlink_to(secret)
    with pytest.raises(CheckpointError, match="leaves the checkpoint folder"):
        load_checkpoints(["org/tiny"])


def test_fuzzed_index_weight_maps_open_or_give_a_checkpoint_error(sharded):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    p, doc = _index(sharded)
    shards = sorted(set(doc["weight_map"].values()))
    names = st.sampled_from(shards) | st.sampled_from(["..", "/", "", "a/../" + shards[0], "./" + shards[0]])
    values = names | st.none() | st.integers() | st.lists(st.text(max_size=3), max_size=2)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.dictionaries(st.sampled_from(sorted(doc["weight_map"])), values) | st.lists(st.integers()))
    def check(weight_map):
        if isinstance(weight_map, dict):
            weight_map = {**doc["weight_map"], **weight_map}
        p.write_text(json.dumps({"weight_map": weight_map}))
        try:
            ck = open_checkpoint(sharded)
        except CheckpointError as e:
            assert "\n" not in str(e)
            return
        with ck:
            for f in ck.files:
                assert f.resolve().parent == sharded.resolve()

    check()


def test_a_file_swapped_or_truncated_after_opening_is_not_read(tmp_path):
    a, b = make_safetensors_files(tmp_path / "run", n=2)
    with open_checkpoint(a) as ck:
        name = next(iter(ck.infos))
        ck.read(name)
        os.replace(b, a)  # another (valid) file under the same name
        with pytest.raises(CheckpointError, match="replaced or resized while open"):
            ck.read(name)
    with open_checkpoint(a) as ck:
        os.truncate(a, os.path.getsize(a) - 4)
        with pytest.raises(CheckpointError, match="replaced or resized while open"):
            ck.read(name)


def test_tensor_names_in_messages_are_escaped_and_shortened(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    evil = "\x1b]0;pwned\x07\x1b[2J" + "B" * 5000
    save_file({"w": np.zeros(2, np.float32), evil: np.zeros(1, np.float32)}, str(tmp_path / "a.safetensors"))
    save_file({"w": np.zeros(2, np.float32)}, str(tmp_path / "b.safetensors"))
    capsys.readouterr()
    rc = main(["inspect", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    out, err = capsys.readouterr()
    _one_line_error(rc, err, "missing from")
    for text in (out, err):
        assert "\x1b" not in text and "\x07" not in text and "B" * 200 not in text
    assert "\\x1b" in err


_SHRINK = """
import os, sys, threading
from extramerge.io import safetensors
from extramerge.engine import units
from extramerge.cli import main

where, victim, size, full = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
owner = units if where == "views" else safetensors.SafetensorsFile
name = "unit_arrays" if where == "views" else "madvise_span"
real, lock, done = getattr(owner, name), threading.Lock(), []
def shrinking(*a, **k):
    # the last unit (the only one whose bytes are cut) truncates the file just before its views are made /
    # its pages are populated; no other thread or worker process touches the cut bytes, so no race
    if where == "views":
        last = a[2][0][1] == 2 * 2**20  # its first segment starts at element 2**21
    else:
        last = str(a[0].path) == victim and a[3] == "populate" and a[2] == full
    with lock:
        if last and not done:
            done.append(os.truncate(victim, size))
    return real(*a, **k)
setattr(owner, name, shrinking)
sys.exit(main(sys.argv[5:]))
"""


@pytest.mark.parametrize("where", ["views", "populate"])
@pytest.mark.parametrize("command", ["merge", "analyze"])
def test_a_checkpoint_truncated_while_read_is_an_error_not_sigbus(tmp_path, where, command):
    """merge and analyze read safetensors through memory maps where EXTRAMERGE_MMAP=1: a page past the
    end of a file that shrank would raise SIGBUS (a negative return code here). The size is checked when a
    chunk's views are made and again once its pages are populated, before the arithmetic touches them."""
    import numpy as np
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    run.mkdir()
    files = []
    for j in range(3):  # one 12 MiB tensor: three 4 MiB units; only the 3rd unit's bytes are cut
        p = run / f"step_{j + 1:06d}.safetensors"
        save_file({"w": np.full(3 * 2**20, j, dtype=np.float32)}, str(p))
        files.append(p)
    before = os.path.getsize(files[0])
    cut = before - 4 * 2**20  # the 3rd unit's bytes are gone
    out = tmp_path / "out" / ("merged.safetensors" if command == "merge" else "report")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "EXTRAMERGE_MMAP": "1"}
    argv = [where, str(files[0]), str(cut), str(before), command, *map(str, files), "-o", str(out)]
    argv += ["--method", "sma"] if command == "merge" else []
    p = subprocess.run(
        [sys.executable, "-c", _SHRINK, *argv, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    _one_line_error(p.returncode, p.stderr, f"{files[0]}: ")
    # the chunk check names the sizes; on a loaded machine the per-read identity check may see it first
    assert (
        f"shrank from {before} to {cut} bytes while being read" in p.stderr
        or "replaced or resized while open" in p.stderr
    ), p.stderr
    assert not out.exists() and not [q for q in tmp_path.rglob("*") if ".tmp-" in q.name]


_WINDOW = """
import os, sys, threading
from extramerge.engine import units
from extramerge.cli import main

victim, size, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ino, lock, done = os.stat(victim).st_ino, threading.Lock(), []

def cut():
    with lock:
        if not done:
            done.append(os.truncate(victim, size))

real_advise = units.advise_spans
def advise_then_cut(spans, advice):
    # mapped reads: the last unit's pages populated and its size checked, then the cut, before any touch
    real_advise(spans, advice)
    if advice == "populate" and any(str(f.path) == victim and hi > last for f, lo, hi in spans):
        cut()
units.advise_spans = advise_then_cut

real_preadv = os.preadv
def cut_then_preadv(fd, buffers, pos, *a):
    # pread reads: the file opened and its size checked, then the cut, before the read itself
    if os.fstat(fd).st_ino == ino and pos <= last < pos + sum(len(b) for b in buffers):
        cut()
    return real_preadv(fd, buffers, pos, *a)
os.preadv = cut_then_preadv
sys.exit(main(sys.argv[4:]))
"""


@pytest.mark.parametrize("command", ["merge", "analyze"])
def test_a_truncation_between_the_last_check_and_the_read_is_an_error_not_sigbus(tmp_path, command):
    """Issue 21 item 11: the input is cut after its last check and before its bytes are read (hooks make
    the window certain). Mapped, that was SIGBUS (the process killed, its staging folder left behind); read
    with pread (the default), it is one error naming the file, and nothing is left."""
    import numpy as np
    from safetensors.numpy import save_file

    run = tmp_path / "run"
    run.mkdir()
    files = []
    for j in range(3):  # one 12 MiB tensor: three 4 MiB units; only the 3rd unit's bytes are cut
        p = run / f"step_{j + 1:06d}.safetensors"
        save_file({"w": np.full(3 * 2**20, j, dtype=np.float32)}, str(p))
        files.append(p)
    size = os.path.getsize(files[0])
    cut, last = size - 4 * 2**20, size - 4 * 2**20 + 4096  # a byte well inside the 3rd unit
    out = tmp_path / "out" / ("merged.safetensors" if command == "merge" else "report")
    env = {k: v for k, v in os.environ.items() if k != "EXTRAMERGE_MMAP"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    argv = [str(files[0]), str(cut), str(last), command, *map(str, files), "-o", str(out), "--quiet"]
    argv += ["--method", "sma"] if command == "merge" else []
    cmd = [sys.executable, "-c", _WINDOW, *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode != -signal.SIGBUS, "killed by SIGBUS"
    _one_line_error(p.returncode, p.stderr, f"{files[0]}: ")
    assert os.path.getsize(files[0]) == cut  # the cut did happen
    assert not out.exists() and not [q for q in tmp_path.rglob("*") if ".tmp-" in q.name]


# ------------------------------------------------------------------------------ --gram: no npz zip bombs


def _bomb_npz(path: Path, *, compressed: bool) -> None:
    """A gram.npz lookalike: compressed (64 MiB of zeros in a few KB), or stored with an array header
    claiming 8 TiB."""
    import zipfile

    import numpy as np
    from numpy.lib import format as npf

    if compressed:
        np.savez_compressed(path, gram=np.zeros((2**12, 2**11)), names=np.array(["w"]))
        return
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z, z.open("gram.npy", "w") as f:
        npf.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (2**40,)})
        f.write(b"\0" * 64)


@pytest.mark.parametrize("compressed", [True, False])
def test_a_gram_npz_bomb_is_refused_before_numpy_inflates_it(tmp_path, capsys, compressed):
    """Issue 21 item 8: ``--gram`` refuses a compressed member, or a header claiming more than the member
    holds, in one line before numpy allocates anything."""
    run = make_safetensors_files(tmp_path / "run", n=3)
    bomb = tmp_path / "gram.npz"
    _bomb_npz(bomb, compressed=compressed)
    assert bomb.stat().st_size < 2**20
    rc, err = _cli(capsys, "merge", *run, "--method", "pc1", "--gram", bomb, "-o", tmp_path / "m", "--quiet")
    why = "is compressed" if compressed else "its header claims 8796093022208 bytes but it holds 192"
    _one_line_error(rc, err, f"{bomb}: array 'gram.npy'", why)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "[1, 2]"])
def test_a_config_json_nested_deep_or_not_an_object_is_copied_as_it_is(tmp_path, capsys, text):
    """Issue 21 item 12: an HF config.json of 100k nested '[' gave a RecursionError traceback when the
    merge set its dtype (and a list, an AttributeError); it is copied as it is, as invalid JSON was."""
    run = make_hf_run(tmp_path / "run", n=2)
    (run[-1] / "config.json").write_text(text)
    rc, err = _cli(capsys, "merge", *run, "--method", "sma", "-o", tmp_path / "m", "--quiet")
    assert rc == 0, err
    assert (tmp_path / "m" / "config.json").read_text() == text
