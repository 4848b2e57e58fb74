"""progress_bar: in place on a terminal; in a log, plain lines at most every LOG_INTERVAL_S seconds."""

import fcntl
import io
import os
import struct
import termios

from rivervalley.common import progress as P


def _feed(file, n=2000, **kw):
    bar = P.progress_bar(file=file, total=n, desc="work", **kw)
    for _ in range(n):
        bar.update()
    bar.close()


def test_in_a_log_no_carriage_returns_and_at_most_a_start_and_an_end_line():
    log = io.StringIO()
    _feed(log)
    text = log.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= 2 and lines[-1].startswith("work: 100%")
    quiet = io.StringIO()
    _feed(quiet, leave=False)  # a bar cleared at the end leaves its first line only
    assert "\r" not in quiet.getvalue() and len(quiet.getvalue().splitlines()) <= 1
    off = io.StringIO()
    _feed(off, enabled=False)
    assert off.getvalue() == ""


def test_on_a_terminal_the_bar_updates_in_place():
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a pty starts 0 wide
    try:
        with os.fdopen(slave, "w", closefd=False) as tty:
            assert P.is_terminal(tty) and not P.is_terminal(io.StringIO())
            _feed(tty, n=3, mininterval=0)
        out = os.read(master, 1 << 16).decode()
    finally:
        os.close(master)
        os.close(slave)
    assert out.replace("\r\n", "\n").count("\r") >= 3 and "work: 100%" in out
