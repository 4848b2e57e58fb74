"""rivervalley.common.publish: the one staging -> publish -> clean-up block (``publishing``), the one rule
for what an output may replace (``refusal``), and the output marker written and read one way."""

from __future__ import annotations

import json
import os
import threading

import pytest

from rivervalley.common import publish as P


def _hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_publishing_renames_the_staged_folder_into_place_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with P.publishing(out) as stage:
        assert stage.parent == out.parent and stage.name.startswith(".out.tmp-")
        (stage / "x.txt").write_text("new")
        assert not out.exists()  # nothing is visible before the block ends
    assert (out / "x.txt").read_text() == "new" and _hidden(out.parent) == []
    with pytest.raises(FileExistsError):  # an existing output only with force
        with P.publishing(out) as stage:
            (stage / "y.txt").write_text("other")
    assert sorted(p.name for p in out.iterdir()) == ["x.txt"] and _hidden(out.parent) == []
    with P.publishing(out, force=True) as stage:
        (stage / "y.txt").write_text("other")
    assert sorted(p.name for p in out.iterdir()) == ["y.txt"] and _hidden(out.parent) == []


def test_publishing_one_file_and_a_block_that_publishes_itself(tmp_path):
    path = tmp_path / "new" / "report.json"
    with P.publishing(path, file=True) as stage:
        (stage / path.name).write_text("{}")
    assert path.read_text() == "{}" and _hidden(path.parent) == []
    out = tmp_path / "two"
    with P.publishing(out, commit=None) as stage:  # e.g. a weights file and its record, under a lock
        (stage / "w.bin").write_text("w")
        P.publish(stage / "w.bin", out, force=False)
    assert out.read_text() == "w" and _hidden(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, P.Terminated])
def test_an_exception_publishes_nothing_and_removes_the_parents_it_created(tmp_path, error):
    (tmp_path / "kept").mkdir()  # existed before: stays, even empty
    out = tmp_path / "kept" / "a" / "b" / "out"
    with pytest.raises(error):
        with P.publishing(out) as stage:
            (stage / "half").write_text("half")
            raise error(15) if error is P.Terminated else error()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_failed_publish_keeps_the_parent_holding_someone_elses_file(tmp_path):
    out = tmp_path / "a" / "out"
    with pytest.raises(RuntimeError):
        with P.publishing(out) as stage:
            (stage / "half").write_text("half")
            (tmp_path / "a" / "theirs.txt").write_text("meanwhile")  # written beside our staging folder
            raise RuntimeError
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["theirs.txt"]


def test_write_file_is_publishing_one_file(tmp_path):
    path = tmp_path / "a" / "b" / "f.txt"

    def fail(p):
        p.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        P.write_file(path, fail)
    assert not (tmp_path / "a").exists()
    P.write_file(path, lambda p: p.write_text("whole"))
    assert path.read_text() == "whole" and _hidden(path.parent) == []
    (tmp_path / "dir").mkdir()
    with pytest.raises(ValueError, match="not a regular file"):
        P.write_file(tmp_path / "dir", lambda p: p.write_text("x"))


# ------------------------------------------------------------------------------------------ the one rule


def test_refusal_is_the_one_rule_for_what_an_output_may_replace(tmp_path):
    ours, theirs = (lambda p: True), (lambda p: False)
    absent = tmp_path / "absent"
    assert P.refusal(absent, False, theirs) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert P.refusal(empty, False, theirs) is None  # an empty folder holds nothing to lose
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert P.refusal(full, False, ours) == "force"
    assert P.refusal(full, True, ours) is None
    assert P.refusal(full, True, theirs) == "foreign"
    assert P.refusal(full, True, None) is None  # whose it is: decided by the caller later
    assert P.refusal(full, False, None) == "force"
    only_marker = tmp_path / "marked"
    only_marker.mkdir()
    (only_marker / P.MARKER).write_text("{}")
    assert P.refusal(only_marker, False, theirs) == "force"
    assert P.refusal(only_marker, False, theirs, ignore=(P.MARKER,)) is None
    link = tmp_path / "link"
    link.symlink_to(full)
    assert P.refusal(link, False, ours) == "force"
    assert P.refusal(link, True, ours) == "foreign"  # a link is never an earlier output
    file = tmp_path / "f.json"
    file.write_text("{}")
    assert P.refusal(file, False, ours) == "force" and P.refusal(file, True, ours) is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert P.refusal(fifo, True, ours) == "special"


def test_claim_folder_and_claim_file_apply_the_rule_with_their_messages(tmp_path):
    out = tmp_path / "sim"
    assert P.claim_folder(out, False, "simulate") == out
    out.mkdir()
    (out / "checkpoints.npz").write_bytes(b"x")
    with pytest.raises(ValueError, match="pass --force to replace simulate's files"):
        P.claim_folder(out, False, "simulate")
    with pytest.raises(ValueError, match="not written by rivervalley"):
        P.claim_folder(out, True, "simulate")
    P.mark(out, {"tool": "rivervalley", "command": "simulate"})
    assert P.claim_folder(out, True, "simulate") == out
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        P.claim_folder(tmp_path / "file", True, "simulate")
    with pytest.raises(ValueError, match="is a folder"):
        P.claim_file(out, True, lambda p: True)
    with pytest.raises(ValueError, match="exists; pass --force"):
        P.claim_file(tmp_path / "file", False, lambda p: True)
    with pytest.raises(ValueError, match="not written by extramerge"):
        P.claim_file(tmp_path / "file", True, lambda p: False, tool="extramerge")
    os.mkfifo(tmp_path / "fifo")
    for claim in (lambda p: P.claim_folder(p, True, "x"), lambda p: P.claim_file(p, True, lambda q: True)):
        with pytest.raises(ValueError, match="not a regular file or folder"):
            claim(tmp_path / "fifo")


# ------------------------------------------------------------------------------------------- the marker


def test_the_marker_is_written_atomically_and_read_as_earlier_versions_wrote_it(tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    P.mark(new, {"tool": "rivervalley", "command": "figures"})
    assert (new / P.MARKER).read_text() == '{"tool": "rivervalley", "command": "figures"}\n'
    assert sorted(p.name for p in new.iterdir()) == [P.MARKER]  # no staging folder left
    assert P.marked(new) and not P.marked(new, "tool", "extramerge")
    # folders that earlier versions wrote (the bytes they wrote) are still recognised
    old_rv, old_em = tmp_path / "figures", tmp_path / "study"
    old_rv.mkdir()
    old_em.mkdir()
    (old_rv / ".rivervalley-output").write_text('{"tool": "rivervalley", "command": "figures"}\n')
    (old_em / ".extramerge-output").write_text('{"tool": "extramerge", "kind": "study"}\n')
    assert P.marked(old_rv)
    assert P.marked(old_em, "kind", "study", ".extramerge-output")
    assert not P.marked(old_em, "kind", "analysis", ".extramerge-output")
    link = tmp_path / "link"
    link.symlink_to(old_rv)
    assert not P.marked(link)  # a link to an earlier output is not one


def test_own_json_reads_only_a_small_regular_file_and_never_waits_on_a_fifo(tmp_path):
    good = tmp_path / "merge.json"
    good.write_text(json.dumps({"tool": "extramerge"}))
    assert P.own_json(good, "tool", "extramerge") and not P.own_json(good, "tool", "rivervalley")
    (tmp_path / "list.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "big.json").write_text(json.dumps({"tool": "extramerge", "pad": "x" * 2**20}))
    for name in ("list.json", "bad.json", "big.json", "absent.json"):
        assert not P.own_json(tmp_path / name, "tool", "extramerge"), name
    assert not P.own_json(tmp_path, "tool", "extramerge")  # a folder
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    result = []
    t = threading.Thread(target=lambda: result.append(P.own_json(fifo, "tool", "extramerge")), daemon=True)
    t.start()
    t.join(10)
    assert result == [False]


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(p.stdout)


def test_staging_names_tell_hosts_apart_and_clean_stale_takes_only_its_own(tmp_path, monkeypatch):
    """Issue 21 item 13: `node-1` and `node1` (and pod names equal in their first 32 letters) used to
    share a host tag, so one host's clean-up deleted the other's live staging folder on shared storage."""
    long_a, long_b = "pod-" + "x" * 40 + "-a", "pod-" + "x" * 40 + "-b"
    assert P._host_tag("node-1") != P._host_tag("node1")
    assert P._host_tag(long_a) != P._host_tag(long_b)
    monkeypatch.setattr(P, "HOST", P._host_tag("node1"))
    monkeypatch.setattr(P, "_LEGACY_HOST", "node1")
    out, dead = tmp_path / "merged", _dead_pid()
    other = tmp_path / f".merged.tmp-{dead}@{P._host_tag('node-1')}-abcd"  # another host's, live there
    mine = tmp_path / f".merged.tmp-{dead}@{P.HOST}-abcd"
    legacy = tmp_path / f".merged.tmp-{dead}@node1-abcd"  # what this host wrote before the change
    for p in (other, mine, legacy):
        p.mkdir()
    assert sorted(P.clean_stale(out)) == sorted([mine, legacy])
    assert other.is_dir() and not mine.exists() and not legacy.exists()


def test_an_output_name_near_the_limit_is_staged_and_a_longer_one_refused_first(tmp_path):
    """Issue 21 item 12: a 250-byte output name failed with 'File name too long' (its staging name is
    longer); one over NAME_MAX is refused before any folder is made."""
    out = tmp_path / "new" / ("a" * 250)
    with P.publishing(out, file=True) as stage:
        assert len(stage.name.encode()) <= P.NAME_MAX
        (stage / out.name).write_text("x")
    assert out.read_text() == "x" and _hidden(out.parent) == []
    other = tmp_path / "new" / ("a" * 249 + "b")  # same first 160 bytes: a different staging name
    assert P._short(other.name) != P._short(out.name)
    too = tmp_path / "made" / ("b" * 256)
    with pytest.raises(OSError, match="longer than 255 bytes"), P.publishing(too, file=True):
        pass
    assert not (tmp_path / "made").exists()


def test_interruptible_and_deferred_leave_an_inherited_ignore_alone():
    """Issue 21: a background job of a script (SIGINT ignored) or a run under nohup (SIGHUP ignored)
    keeps ignoring them inside both blocks, also when one arrives; SIGTERM still stops it."""
    import signal

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM)}
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with P.interruptible():
            with P.deferred():
                assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
                assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
                os.kill(os.getpid(), signal.SIGINT)  # ignored: neither held nor raised at the end
                os.kill(os.getpid(), signal.SIGHUP)
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            with pytest.raises(P.Terminated) as e:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before os.kill returns here
            assert e.value.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    finally:
        for s, h in before.items():
            signal.signal(s, h)
