"""Untrusted pickles checked before any unpickler sees them: ``scan`` walks the opcodes (their layout
taken from ``pickletools.opcodes``; nothing built, nothing called) and refuses, with one line naming the
file, a pickle that would make the unpickler use more memory than a budget proportional to its size
(nested empty containers are one byte each but cost ~64 to ~184; a memo index of 2**31 makes the C
unpickler allocate an array of that many pointers), and, where the caller says so, a BUILD whose target
is not an object the pickle itself created with NEWOBJ of an allowed class (BUILD sets attributes, so on
a class, a function or an enum member it would change process-wide state). ``check_torch_zip`` applies
it to the ``data.pkl`` of a ``torch.save`` archive (a ``.pt`` file or a DCP chunk) after refusing
compressed members: torch.save never compresses, and an inflated record is a zip bomb.

Budget: the estimated bytes the unpickler allocates (``_COST``, CPython 3.11 object sizes rounded up,
every object counted as if it lived to the end) may not exceed ``AMPLIFICATION`` times the pickle's size
plus ``FLOOR``. Ordinary checkpoint pickles estimate 11× (a state dict's data.pkl) to 27× (DCP metadata
of 40 000 small chunks); nested empty containers 70× and more. The scan is Python: ~1 µs an opcode."""

from __future__ import annotations

import contextlib
import mmap
import pickletools
import zipfile
from collections.abc import Collection

from . import safety
from .errors import CheckpointError

__all__ = ["AMPLIFICATION", "FLOOR", "PICKLE_LIMIT", "scan", "check_torch_zip", "check_torch_file"]

AMPLIFICATION = 40  # estimated unpickled bytes per pickle byte, at most
FLOOR = 16 * 2**20  # ... plus this much, whatever the size (small files)
PICKLE_LIMIT = 2 * 2**30  # bytes of one pickle scanned and unpickled at most

# Bytes an opcode makes the unpickler allocate (the object it pushes, or what it adds to a container).
_COST = {
    **dict.fromkeys(("EMPTY_DICT", "DICT", "BUILD"), 184),  # sized for a few items (BUILD: __dict__)
    **dict.fromkeys(("EMPTY_LIST", "LIST"), 56),
    **dict.fromkeys(("EMPTY_SET", "FROZENSET"), 216),
    **dict.fromkeys(("EMPTY_TUPLE", "TUPLE", "TUPLE1", "TUPLE2", "TUPLE3"), 64),
    **dict.fromkeys(("NEWOBJ", "NEWOBJ_EX", "OBJ", "INST"), 64),
    "REDUCE": 160,  # whatever the callable returns: a torch.Size, a tensor (and torch's C++ side of it)
    **dict.fromkeys(("PERSID", "BINPERSID"), 160),
    **dict.fromkeys(("GET", "BINGET", "LONG_BINGET", "DUP", "MARK"), 8),  # a stack slot
    **dict.fromkeys(("INT", "BININT", "BININT2", "LONG", "LONG1", "LONG4"), 32),  # BININT1: cached
    **dict.fromkeys(("FLOAT", "BINFLOAT"), 24),
    **dict.fromkeys(("APPEND", "APPENDS", "SETITEM", "SETITEMS", "ADDITEMS"), 0),  # per item below
}
_PER_ITEM = {"APPEND": 8, "APPENDS": 8, "SETITEM": 48, "SETITEMS": 48, "ADDITEMS": 32}
_MEMO_SLOT = 16  # the C unpickler's memo is an array as long as the largest index (grown ×2)
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
            "BINUNICODE8", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}  # fmt: skip
_MARK = pickletools.markobject
_SLICE_OPS = ("TUPLE", "LIST", "DICT", "FROZENSET")  # build a container of the items above the MARK
# What scan needs to know of an opcode: (name, bytes it costs, pops items down to a MARK, items it pops
# otherwise / below the MARK, items it pushes).
_OPS = {
    op.code: (
        op.name,
        _COST.get(op.name, 0) + (50 if op.name in _STRINGS else 0),
        _MARK in op.stack_before,
        op.stack_before.index(_MARK) if _MARK in op.stack_before else len(op.stack_before),
        len(op.stack_after),
    )
    for op in pickletools.opcodes
}
_TAGGED = {"GLOBAL", "STACK_GLOBAL", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "NEWOBJ",
           "NEWOBJ_EX", "EXT1", "EXT2", "EXT4", "DUP", "BUILD", "MARK", "POP"}  # fmt: skip


def _arg_kinds() -> dict[int, tuple]:
    """Each opcode's _OPS entry and how its argument is laid out: (kind, bytes), kind 0 none, 1 ``bytes``
    fixed, 2 one line, 3 two lines (GLOBAL, INST), 4 a length of ``bytes`` (unsigned) then that many
    bytes, 5 the same with a signed length."""
    out = {}
    for op in pickletools.opcodes:
        a = op.arg
        if a is None:
            kind = (0, 0)
        elif a.n >= 0:
            kind = (1, a.n)
        elif a.n == pickletools.UP_TO_NEWLINE:
            kind = (3, 0) if a.name == "stringnl_noescape_pair" else (2, 0)
        elif a.n == pickletools.TAKEN_FROM_ARGUMENT4:
            kind = (5, 4)
        else:
            kind = (4, {pickletools.TAKEN_FROM_ARGUMENT1: 1, pickletools.TAKEN_FROM_ARGUMENT4U: 4,
                        pickletools.TAKEN_FROM_ARGUMENT8U: 8}[a.n])  # fmt: skip
        out[op.code.encode("latin-1")[0]] = (*_OPS[op.code], *kind)
    return out


_KINDS = _arg_kinds()
_MEMO_OPS = {"PUT": 0, "BINPUT": 0, "LONG_BINPUT": 0, "MEMOIZE": 0, "GET": 1, "BINGET": 1, "LONG_BINGET": 1}
_TEXT = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}


def scan(
    data,
    where: object,
    *,
    build: Collection[tuple] | None = None,
    size=None,
    corrupt="corrupt pickle",
    start=0,
) -> int:
    """Check the pickle at ``data[start:]`` (bytes, or an mmap of a file of ``size`` bytes) opcode by
    opcode, building nothing; returns the position after its STOP. ``build``: if given, BUILD may only
    target an object made by NEWOBJ/NEWOBJ_EX of a class named (module, name) in it. Raises
    CheckpointError naming ``where`` (``corrupt`` says what a pickle that is not one is)."""
    size = len(data) - start if size is None else size
    if size > PICKLE_LIMIT:
        raise CheckpointError(f"{where}: a pickle of {size} bytes (over {PICKLE_LIMIT}); refusing it")
    budget = AMPLIFICATION * size + FLOOR
    state = _State()
    stack, memo = state.stack, state.memo
    pos, n, kinds = start, len(data), _KINDS
    try:
        while True:
            if pos >= n:
                raise ValueError("no STOP")
            code = data[pos]
            if code not in kinds:
                raise ValueError(f"unknown opcode {bytes([code])!r} at byte {pos}")
            name, cost, to_mark, pops, pushes, kind, k = kinds[code]
            a = pos + 1
            if kind == 0:
                nxt = a
            elif kind == 1:
                nxt = a + k
            elif kind == 2:
                nxt = data.find(b"\n", a) + 1
            elif kind == 3:
                mid = data.find(b"\n", a) + 1
                nxt = data.find(b"\n", mid) + 1 if mid else 0
            else:
                length = int.from_bytes(data[a : a + k], "little", signed=kind == 5)
                a += k
                nxt = a + length if length >= 0 else 0
            if nxt <= pos or nxt > n:
                raise ValueError(f"{name} at byte {pos}: its argument runs past the end")
            state.cost += cost + (nxt - a if kind >= 2 else 0)  # a string or number: its size
            memo_op = _MEMO_OPS.get(name)
            if memo_op is not None:
                if name == "MEMOIZE":
                    key = len(memo)
                elif kind == 1:
                    key = int.from_bytes(data[a:nxt], "little")
                else:
                    key = int(bytes(data[a : nxt - 1]))
                if memo_op:
                    stack.append(memo[key])  # KeyError: never stored (a corrupt pickle)
                else:
                    state.put(key)
            elif to_mark or name in _TAGGED:
                arg = None
                if name in _TEXT and nxt - a <= 1024:
                    raw = bytes(data[a : nxt - (kind == 2)])
                    with contextlib.suppress(UnicodeDecodeError):
                        arg = raw.decode("raw-unicode-escape" if kind == 2 else "utf-8", "surrogatepass")
                elif kind == 3:
                    module, _, attr = bytes(data[a : nxt - 1]).partition(b"\n")
                    arg = (module.decode("utf-8", "replace"), attr.decode("utf-8", "replace"))
                state.step(name, arg, to_mark, pops, pushes, build, where)
            else:
                if len(stack) < pops or (pops and _MARK in stack[-pops:]):
                    raise ValueError(f"{name} pops {pops} items from a stack of {len(stack)} or a MARK")
                if pops:
                    del stack[-pops:]
                if pushes:
                    stack.extend((None,) * pushes)
            if state.cost > budget:
                raise CheckpointError(
                    f"{where}: refusing a pickle that would take more than {AMPLIFICATION}× its size in "
                    f"memory (about {state.cost} bytes by byte {pos}; a crafted file?)"
                )
            pos = nxt
            if name == "STOP":
                return pos
    except CheckpointError:
        raise
    except Exception as e:  # truncated arguments, unknown opcodes, no STOP, bad memo keys
        text = f"memo key {e} was never stored" if isinstance(e, KeyError) else str(e)
        what = safety.shown(text.splitlines()[0] if text else type(e).__name__, 120)[1:-1]
        raise CheckpointError(f"{where}: {corrupt} ({what})") from None


class _State:
    """The unpickler's stack and memo as scan models them: each slot holds None (some object), _MARK, or
    what BUILD needs to know: ("g", module, name) for a global, ("new", module, name) for an instance
    NEWOBJ made of one, ("s", text) for a short string (STACK_GLOBAL's operands)."""

    def __init__(self):
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict = {}
        self.memo_top = -1
        self.cost = 0

    def put(self, key: int) -> None:
        """PUT/MEMOIZE: the top of the stack stored at ``key`` (the stack unchanged)."""
        if key in self.memo or not self.stack or self.stack[-1] is _MARK:
            raise ValueError(f"memo key {key} stored twice, or a MARK or nothing stored")
        self.memo[key] = self.stack[-1]
        if key > self.memo_top:
            self.cost += _MEMO_SLOT * (key - self.memo_top)
            self.memo_top = key

    def step(self, name, arg, to_mark, pops, pushes, build, where) -> None:
        stack = self.stack
        if to_mark or (name == "POP" and stack and stack[-1] is _MARK):
            if not self.marks:
                raise ValueError(f"{name} without a MARK")
            at = self.marks.pop()
            items = len(stack) - at - 1
            per = _PER_ITEM.get(name, 8 if name in _SLICE_OPS else 0)
            self.cost += per * (items // 2 if name == "SETITEMS" else items)
            if name == "OBJ" and not items:
                raise ValueError("OBJ without a class")
            del stack[at:]
            if name == "POP":
                return
        else:
            self.cost += _PER_ITEM.get(name, 0)
        if len(stack) < pops:
            raise ValueError(f"{name} pops {pops} items from a stack of {len(stack)}")
        popped = stack[len(stack) - pops :]
        del stack[len(stack) - pops :]
        if _MARK in popped:
            raise ValueError(f"{name} takes a MARK as an argument")
        pushed: list = [None] * pushes
        if name == "GLOBAL":
            pushed = [("g", *arg)]
        elif name == "STACK_GLOBAL":
            pushed = [("g", *(p[1] if p and p[0] == "s" else None for p in popped))]
        elif name in _TEXT and arg is not None and len(arg) <= 256:
            pushed = [("s", arg)]
        elif name in ("NEWOBJ", "NEWOBJ_EX") and popped[0] and popped[0][0] == "g":
            pushed = [("new", *popped[0][1:])]
        elif name in ("EXT1", "EXT2", "EXT4"):
            pushed = [("g", None, None)]
        elif name == "DUP":
            pushed = popped * 2
        elif name == "BUILD":
            target = popped[0]
            if build is not None and not (target and target[0] == "new" and target[1:] in build):
                what = "a class or function" if target and target[0] == "g" else "an object"
                raise CheckpointError(
                    f"{where}: refusing a pickle that sets the state of {what} it did not create "
                    "(BUILD; a crafted file?)"
                )
            pushed = [target]
        elif name == "MARK":
            self.marks.append(len(stack))
            pushed = [_MARK]
        stack.extend(pushed)


def check_torch_zip(f, where: object, size: int, corrupt: str = "corrupt torch.save archive") -> None:
    """The ``torch.save`` archive readable from ``f`` (a seekable binary file of ``size`` bytes): every
    member stored uncompressed, one ``data.pkl`` no larger than the archive, its pickle within budget."""
    try:
        z = zipfile.ZipFile(f)
        records = z.infolist()
        packed = [r for r in records if r.compress_type != zipfile.ZIP_STORED]
        if packed:
            raise CheckpointError(
                f"{where}: record {safety.shown(packed[0].filename)} of its zip archive is compressed "
                "(torch.save never compresses; a crafted file?)"
            )
        pkl = [r for r in records if r.filename == "data.pkl" or r.filename.endswith("/data.pkl")]
        if len(pkl) != 1:
            raise CheckpointError(f"{where}: expected one data.pkl in its zip archive, found {len(pkl)}")
        if pkl[0].file_size > min(size, PICKLE_LIMIT):
            raise CheckpointError(f"{where}: its data.pkl claims {pkl[0].file_size} bytes; refusing it")
        data = z.read(pkl[0])
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError, KeyError) as e:
        raise CheckpointError(f"{where}: {corrupt} ({type(e).__name__})") from None
    scan(data, f"{where} (data.pkl)", corrupt=corrupt)


_NOT_TORCH = "corrupt or not a PyTorch checkpoint"


def check_torch_file(f, where: object, size: int) -> None:
    """A ``torch.save`` file open as ``f`` (binary, seekable, ``size`` bytes): its zip archive as
    ``check_torch_zip`` checks it, or the pickles of the legacy format (magic number, protocol, system
    information, the object, its storage keys) scanned one after the other in a map of the file."""
    f.seek(0)
    if zipfile.is_zipfile(f):
        f.seek(0)
        check_torch_zip(f, where, size, _NOT_TORCH)
        return
    if size == 0:
        raise CheckpointError(f"{where}: {_NOT_TORCH} (an empty file)")
    with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
        pos = 0
        for _ in range(5):
            pos = scan(m, where, size=size, corrupt=_NOT_TORCH, start=pos)
