"""Optional compiled kernels, built with the system C compiler on first use and loaded with ctypes.

Each kernel is a :class:`Kernel`: one C source in this folder, the ctypes declarations of its functions and
the flag sets to try. ``load(kernel)`` compiles the source with ``$CC`` (default ``cc``), caches the library
under ``$RIVERVALLEY_CACHE`` (default ``$XDG_CACHE_HOME/rivervalley`` or ``~/.cache/rivervalley``) by a
hash of the source, the flags, the compiler and the CPU, checks it through a file descriptor (this user's,
not writable by others) and loads it. Without a compiler, or with ``RIVERVALLEY_NATIVE=0``, :func:`load`
returns None and the caller uses its pure-Python path; :func:`status` says why.

* :data:`NOISE` (``noise.c``, the default): Philox4x32-10 + Box-Muller normals fused with the simulator's
  update. torch's CPU ``randn`` (mt19937 + Box-Muller) yields about 240 M float32 normals/s per core here,
  which capped the simulator at 19% of the memory-bandwidth bound. Philox is counter-based, so a normal is
  generated in registers right where the update needs it and never touches memory; the kernel draws about
  4x as many normals per second as torch's sampler (``python -m benchmarks.bench_simulator``).
  :class:`PhiloxNormals` drives it (importing torch when first used).
* :data:`GRAM` (``gram.c``): the Gram matrix of differences from a reference in one pass over float32,
  bfloat16, float16 or float64 inputs, accumulated in float64 (``rv_gram_diff``; extramerge's analysis
  pass uses it).

This module does not import torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["GRAM", "NOISE", "Kernel", "PhiloxNormals", "load", "philox4x32_10", "status"]

SOURCE = Path(__file__).with_name("noise.c")
# -ffast-math lets gcc vectorise logf through glibc's libmvec (noise.c computes sin and cos itself). The
# -fno-builtin flags keep gcc from fusing sin and cos into a sincosf call, which it cannot vectorise.
# The vector width is left to gcc's tuning for the CPU (-march=native: 512 bits on this AMD EPYC, 8%
# faster than 256 here).
_FAST = ["-O3", "-ffast-math", "-fopenmp-simd", "-fno-builtin-sinf", "-fno-builtin-cosf"]
_FAST += ["-fno-builtin-sincosf", "-fPIC"]
FLAG_SETS = (["-march=native", *_FAST], _FAST, ["-O2", "-fPIC"])

_lock = threading.Lock()
_state: dict = {}


def _cache_dir() -> Path:
    if os.environ.get("RIVERVALLEY_CACHE"):
        return Path(os.environ["RIVERVALLEY_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rivervalley"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _compiler_id(cc: list[str]) -> str | None:
    try:
        out = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else None


def _compile(cc: list[str], flags: list[str], dest: Path, source: Path = SOURCE) -> str | None:
    """Compile ``source`` to ``dest`` (atomically: build in a temporary folder, then rename). Returns an
    error message, or None on success. The link step omits -ffast-math on purpose (see noise.c)."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        obj, so = os.path.join(tmp, "kernel.o"), os.path.join(tmp, "kernel.so")
        for cmd in ([*cc, *flags, "-c", str(source), "-o", obj], [*cc, "-shared", obj, "-o", so, "-lm"]):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            except (OSError, subprocess.SubprocessError) as e:
                return f"{' '.join(cmd)}: {e}"
            if out.returncode != 0:
                last = (out.stderr or out.stdout or "").strip().splitlines() or [f"exit {out.returncode}"]
                return f"{' '.join(cmd)}: {last[-1]}"
        os.chmod(so, 0o700)  # the compiler's mode follows the umask (0o777 under umask 000)
        os.replace(so, dest)
    return None


def _declare(lib) -> None:
    """ctypes signatures of noise.c's functions (an AttributeError if the library lacks one)."""
    i64, u64, vp = ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
    lib.rv_philox4x32_10.argtypes = [vp, vp, vp]
    lib.rv_philox4x32_10.restype = None
    for name in ("rv_normal_f32", "rv_normal_f64"):
        getattr(lib, name).argtypes = [vp, i64, i64, i64, i64, u64, u64]
        getattr(lib, name).restype = None
    for name in ("rv_ar1_jumps_f32", "rv_ar1_jumps_f64"):
        getattr(lib, name).argtypes = [vp, i64, vp, i64, i64, vp, vp, vp, i64, i64, i64, i64, u64, u64]
        getattr(lib, name).restype = None
    for name in ("rv_sgd_steps_f32", "rv_sgd_steps_f64"):
        getattr(lib, name).argtypes = [vp, i64, vp, i64, vp, vp, vp, vp, i64, i64, i64, i64, u64, u64]
        getattr(lib, name).restype = None


def _private_folder(folder: Path) -> None:
    """Create ``folder`` and its missing parents (mode 0o700 whatever the umask) if needed; refuse one that
    another user owns or others can write to, or one inside a folder that others could swap it out of
    (``_check_ancestors``), since a library loaded from it runs in this process."""
    missing = [p for p in (folder, *folder.parents) if not p.exists()]
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            p.mkdir(mode=0o700)
            os.chmod(p, 0o700)  # mkdir's mode is masked by the umask: set it exactly
    _check_private(folder)
    _check_ancestors(folder)


def _check_private(path: Path) -> None:
    """Refuse ``path`` unless this user owns it (and the link, if it is one: another user's link in /tmp
    to a folder of ours would not do) and neither group nor others may write to it."""
    st = path.stat()
    if (
        os.lstat(path).st_uid != os.getuid()
        or st.st_uid != os.getuid()
        or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise OSError(f"{path} is not private to this user (owner, or group/world write permission)")


def _check_ancestors(folder: Path) -> None:
    """Refuse a cache folder with an ancestor (its real path's) that group or others may write without
    the sticky bit, or that a user other than root and this one owns: whoever can write there can rename
    the cache folder away and put their own in its place between our checks and the load."""
    for p in Path(os.path.realpath(folder)).parents:
        st = os.stat(p)
        shared = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX
        if shared or st.st_uid not in (0, os.getuid()):
            raise OSError(
                f"{folder} is inside {p}, which "
                + ("others may write (no sticky bit)" if shared else f"user {st.st_uid} owns")
                + "; refusing to load a library from it (set RIVERVALLEY_CACHE to a private folder)"
            )


class _NotPrivate(OSError):
    """A library in the cache that is not this user's alone: never loaded, nor replaced (its folder is
    skipped)."""


def _open_library(path: Path) -> int:
    """A descriptor of the library ``path`` (not a link), checked on the descriptor: a regular file this
    user owns that neither group nor others may write. What is loaded is this very file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        os.close(fd)
        raise _NotPrivate(f"{path} is not private to this user (owner, or group/world write permission)")
    return fd


def _dlopen(path: Path):
    """ctypes.CDLL of the library checked by ``_open_library``, loaded through its descriptor
    (/proc/self/fd/N) where /proc exists. The descriptor stays open while the library may be loaded:
    the dynamic loader knows a loaded library by that name, so the number must never name another."""
    fd = _open_library(path)
    name = f"/proc/self/fd/{fd}"
    if not os.path.exists(name):  # no /proc (not Linux): the path, just checked
        os.close(fd)
        name = str(path)
    try:
        return ctypes.CDLL(name)
    except OSError:
        with contextlib.suppress(OSError):
            if name != str(path):
                os.close(fd)
        raise


def _declare_gram(lib) -> None:
    """ctypes signature of gram.c's ``rv_gram_diff(xs, codes, n, ref, m, out) -> int32``."""
    i64, vp = ctypes.c_int64, ctypes.c_void_p
    lib.rv_gram_diff.argtypes = [vp, vp, i64, i64, i64, vp]
    lib.rv_gram_diff.restype = ctypes.c_int32


@dataclass(frozen=True)
class Kernel:
    """One compiled kernel: ``name`` (of the cached library, ``name-<hash>.so``), its C ``source``, the
    ``declare`` function that sets its functions' ctypes signatures (raising AttributeError on a library
    that lacks one) and the compiler ``flag_sets`` tried in order."""

    name: str
    source: Path
    declare: Callable
    flag_sets: tuple


NOISE = Kernel("noise", SOURCE, _declare, FLAG_SETS)
# No -ffast-math: NaN and Inf must reach the result (the caller detects them), and the summation order is
# written out in vector code, so nothing is gained by letting the compiler reassociate.
GRAM = Kernel(
    "gram",
    SOURCE.with_name("gram.c"),
    _declare_gram,
    (["-O3", "-march=native", "-fPIC"], ["-O3", "-fPIC"], ["-O2", "-fPIC"]),
)


def _load_or_build(cc: list[str], flags: list[str], path: Path, kernel: Kernel = NOISE):
    """Load the library at ``path``, building it first if it is missing; a file that does not load, or
    lacks the kernel's functions (a stale or foreign build), is rebuilt once. Returns (lib, None), or
    (None, error) when the compiler fails."""
    _private_folder(path.parent)
    for attempt in range(2):
        if attempt or not path.exists():
            err = _compile(cc, flags, path, kernel.source)
            if err:
                return None, err
        try:
            lib = _dlopen(path)
            kernel.declare(lib)
        except (OSError, AttributeError) as e:
            if isinstance(e, _NotPrivate):
                raise
            if attempt:
                why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                raise OSError(f"{path} does not load as the kernel ({why})") from None
            continue  # a stale or broken file: rebuild it once
        return lib, None
    raise OSError(f"{path} does not load")  # pragma: no cover - the loop returns or raises first


def _load(kernel: Kernel = NOISE):
    if os.environ.get("RIVERVALLEY_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "disabled by RIVERVALLEY_NATIVE=0"
    cc = shlex.split(os.environ.get("CC") or "cc")
    if not cc or shutil.which(cc[0]) is None:
        return None, f"no C compiler ({' '.join(cc)!r} not found; set CC)"
    cid = _compiler_id(cc)
    if cid is None:
        return None, f"C compiler {' '.join(cc)!r} does not run"
    try:
        source = kernel.source.read_text()
    except OSError as e:
        return None, f"cannot read the kernel source: {e}"
    errors = []
    for flags in kernel.flag_sets:
        key = "\n".join([source, " ".join(cc), " ".join(flags), cid, platform.machine(), _cpu_flags()])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        for folder in (_cache_dir(), Path(tempfile.gettempdir()) / f"rivervalley-{os.getuid()}"):
            path = folder / f"{kernel.name}-{digest}.so"
            try:
                lib, err = _load_or_build(cc, flags, path, kernel)
            except OSError as e:  # an unwritable or shared cache folder, or a library that does not load
                errors.append(f"{path}: {e}")
                continue
            if err:
                errors.append(err)
                break  # these flags fail to compile: another folder will not help
            return lib, f"compiled with {' '.join(cc)} {' '.join(flags)}: {path}"
    return None, f"could not build the native kernel {kernel.source.name}: " + "; ".join(errors)


def load(kernel: Kernel = NOISE):
    """The compiled library of ``kernel`` (ctypes.CDLL), or None when it is unavailable (see
    :func:`status`). Built or loaded once per process."""
    with _lock:
        if kernel.name not in _state:
            _state[kernel.name] = _load(kernel)
        return _state[kernel.name][0]


def status(kernel: Kernel = NOISE) -> dict:
    """``{'available': bool, 'detail': str}``: where ``kernel``'s library came from, or why there is
    none."""
    lib = load(kernel)
    return {"available": lib is not None, "detail": _state[kernel.name][1]}


def philox4x32_10(counter, key) -> list[int]:
    """One Philox4x32-10 block (4 uint32 words) for ``counter`` (4 words) and ``key`` (2 words): the
    known-answer check of Random123's ``kat_vectors``."""
    lib = load()
    if lib is None:
        raise RuntimeError(status()["detail"])
    ctr = (ctypes.c_uint32 * 4)(*counter)
    k = (ctypes.c_uint32 * 2)(*key)
    out = (ctypes.c_uint32 * 4)()
    lib.rv_philox4x32_10(ctr, k, out)
    return list(out)


class _TorchFloats:
    """(torch.float32, torch.float64), imported on first use: this module does not import torch."""

    def __get__(self, obj, owner) -> tuple:
        import torch

        return (torch.float32, torch.float64)


class PhiloxNormals:
    """Standard normals for [S, p] tensors from the native kernel: normal (i, j) of draw d is a pure
    function of (key, d, i, j), so the numbers never depend on the thread count. Each :meth:`fill` or
    :meth:`affine` call consumes one draw. Rows are split across ``threads`` (ctypes releases the GIL)."""

    DTYPES = _TorchFloats()

    def __init__(self, key: int, threads: int | None = None):
        import torch

        self.lib = load()
        if self.lib is None:
            raise RuntimeError(status()["detail"])
        self.key = int(key) & (2**64 - 1)
        self.draws = 0
        self.threads = max(1, int(threads if threads is not None else torch.get_num_threads()))
        self._f64 = torch.float64
        self.pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def _run(self, fn, rows: int, cols: int, *args, draws: int = 1) -> None:
        draw = self.draws
        self.draws += draws
        parts = min(self.threads, rows) if rows * cols * draws >= 1 << 15 else 1
        bounds = [rows * k // parts for k in range(parts + 1)]
        futures = [
            self.pool.submit(fn, *args, bounds[k], bounds[k + 1], cols, self.key, draw)
            for k in range(1, parts)
        ]
        fn(*args, bounds[0], bounds[1], cols, self.key, draw)
        for f in futures:
            f.result()

    @staticmethod
    def _check(t: torch.Tensor, name: str) -> None:
        if t.device.type != "cpu" or t.dtype not in PhiloxNormals.DTYPES or t.ndim != 2 or t.stride(1) != 1:
            raise ValueError(f"{name}: need a CPU float32/float64 [S, p] tensor with unit column stride")
        if t.shape[0] > 1 and t.stride(0) < t.shape[1]:
            raise ValueError(f"{name}: rows overlap (row stride {t.stride(0)} < {t.shape[1]} columns)")

    @staticmethod
    def _disjoint(x: torch.Tensor, other: torch.Tensor, name: str) -> None:
        def span(t):
            last = sum((n - 1) * st for n, st in zip(t.shape, t.stride(), strict=True))
            return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()

        (a0, a1), (b0, b1) = span(x), span(other)
        if x.numel() and other.numel() and a0 < b1 and b0 < a1:
            raise ValueError(f"{name}: must not overlap x")

    def fill(self, out: torch.Tensor) -> torch.Tensor:
        """Write fresh normals into ``out`` [S, p] and return it."""
        self._check(out, "out")
        fn = self.lib.rv_normal_f64 if out.dtype == self._f64 else self.lib.rv_normal_f32
        self._run(fn, out.shape[0], out.shape[1], out.data_ptr(), out.stride(0))
        return out

    def _vectors(self, x: torch.Tensor, named) -> list[int]:
        p = x.shape[1]
        for v, name in named:
            if v.dtype != x.dtype or v.shape != (p,) or not v.is_contiguous() or v.device.type != "cpu":
                raise ValueError(f"{name}: need a contiguous CPU [{p}] vector of dtype {x.dtype}")
        return [v.data_ptr() for v, _ in named]

    def _copy(self, x: torch.Tensor, copy) -> tuple:
        if copy is None:
            return (None, 0)
        self._check(copy, "copy")
        if copy.dtype != x.dtype or copy.shape != x.shape:
            raise ValueError("copy: need the shape and dtype of x")
        self._disjoint(x, copy, "copy")
        return (copy.data_ptr(), copy.stride(0))

    def affine(self, x, a, b, c, copy=None) -> torch.Tensor:
        """``x ← a ⊙ x + b + c ⊙ ξ`` in place with fresh normals ξ, rows of [S, p]; ``a, b, c`` are [p]
        vectors of x's dtype. ``copy`` (optional, [S, p] of the same dtype, for example a checkpoint slot):
        also receives the new values, by non-temporal stores where the CPU has them."""
        self._check(x, "x")
        vecs = self._vectors(x, ((a, "a"), (b, "b"), (c, "c")))
        dst = self._copy(x, copy)
        # one jump of the multi-jump kernel, its slot being ``copy`` (or none)
        fn = self.lib.rv_ar1_jumps_f64 if x.dtype == self._f64 else self.lib.rv_ar1_jumps_f32
        self._run(fn, x.shape[0], x.shape[1], x.data_ptr(), x.stride(0), *dst, 0, *vecs, 1)
        return x

    def sgd_steps(self, x, h, g, sd, lrs, copy=None) -> torch.Tensor:
        """``len(lrs)`` SGD steps in place on the unrotated quadratic, step t consuming one draw:
        ``x ← x − lr_t (h ⊙ x − g + sd ⊙ ξ_t)`` (``h, g, sd``: [p] vectors of x's dtype; ``lrs``: a contiguous
        float64 CPU tensor). Each thread takes its rows through all the steps with no synchronisation in
        between. ``copy``: as in :meth:`affine`, receives the final values."""
        self._check(x, "x")
        vecs = self._vectors(x, ((h, "h"), (g, "g"), (sd, "sd")))
        if lrs.dtype != self._f64 or lrs.ndim != 1 or not lrs.is_contiguous() or lrs.device.type != "cpu":
            raise ValueError("lrs: need a contiguous CPU float64 vector")
        n = lrs.numel()
        if n == 0:
            return x if copy is None else copy.copy_(x)
        dst = self._copy(x, copy)
        fn = self.lib.rv_sgd_steps_f64 if x.dtype == self._f64 else self.lib.rv_sgd_steps_f32
        args = (x.data_ptr(), x.stride(0), *dst, *vecs, lrs.data_ptr(), n)
        self._run(fn, x.shape[0], x.shape[1], *args, draws=n)
        return x

    def jumps(self, x, a, b, c, out) -> torch.Tensor:
        """``n = out.shape[1]`` updates ``x ← a ⊙ x + b + c ⊙ ξ_k`` in place (one draw each), the k-th result
        also written to ``out[:, k]`` ([S, n, p], unit column stride; for example consecutive checkpoint
        slots), by non-temporal stores where possible. Each thread takes its rows through all n updates
        with no synchronisation in between."""
        self._check(x, "x")
        vecs = self._vectors(x, ((a, "a"), (b, "b"), (c, "c")))
        s, p = x.shape
        if (
            out.ndim != 3
            or out.device.type != "cpu"
            or out.dtype != x.dtype
            or out.shape[0] != s
            or out.shape[2] != p
            or out.stride(2) != 1
        ):
            raise ValueError(
                f"out: need a CPU [{s}, n, {p}] tensor of dtype {x.dtype} with unit column stride"
            )
        if s > 1 and out.stride(0) < out.shape[1] * p and out.shape[1] > 0:
            raise ValueError(
                f"out: need each row's {out.shape[1]} slots after one another (row stride >= n·p)"
            )
        self._disjoint(x, out, "out")
        n = out.shape[1]
        if n == 0:
            return x
        fn = self.lib.rv_ar1_jumps_f64 if x.dtype == self._f64 else self.lib.rv_ar1_jumps_f32
        args = (x.data_ptr(), x.stride(0), out.data_ptr(), out.stride(0), out.stride(1), *vecs, n)
        self._run(fn, s, p, *args, draws=n)
        return x
