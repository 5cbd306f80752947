"""The compiled CPU kernel (``tbn_lut.c``): packed TBN linear layers by byte lookup tables.

The C source (``tbn_lut.c`` and its block kernel ``tbn_lut_lanes.h``) ships with the
package and is compiled on first use with the system C compiler
(``$CC``, else ``cc``/``gcc``/``clang``) for the machine it runs on (``-O3 -march=native``,
OpenMP where the compiler has it), into a cache folder (``$HF_TBN_CACHE``, else
``$XDG_CACHE_HOME/hf_tbn`` or ``~/.cache/hf_tbn``; an empty variable counts as unset) keyed by the
source, the flags, the compiler and the CPU, and loaded with ctypes: no Python headers, no torch
extension build.

The cache is trusted only as far as it is private: the folder is created ``0700``; a folder, library
or checksum file that another user owns, or that group or others can write, is refused (whoever can
write it could run code in this process). Each build records the library's size and sha256 beside it
(written atomically, under a lock file so that concurrent first uses build once); a library is loaded
only when it matches that record, and rebuilt otherwise (a truncated or altered file is never mapped).
When no compiler is found, the build fails or the cache is refused, :func:`native_error` says why and
the ``"auto"`` backend uses the torch path.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..tiling import check_tile_operands

SOURCES = tuple(Path(__file__).with_name(name) for name in ("tbn_lut.c", "int8_rows.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("tbn_lut_lanes.h", "tbn_lut_avx512.h"))
FLAGS = ("-std=c11", "-O3", "-march=native", "-shared", "-fPIC")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_ERRORS = {-1: "out of memory for the lookup tables", -2: "K must be a multiple of 8"}


class NativeUnavailable(RuntimeError):
    """The CPU kernel could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    """The build cache folder: ``$HF_TBN_CACHE``, else ``$XDG_CACHE_HOME/hf_tbn``, else ``~/.cache/hf_tbn``."""
    if os.environ.get("HF_TBN_CACHE"):
        return Path(os.environ["HF_TBN_CACHE"]).absolute()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "hf_tbn"


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise NativeUnavailable("no C compiler found (set CC, or apt-get install gcc)")


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and flags (a shared cache may serve several machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(line for line in lines if line.startswith(("model name", "flags", "Features")))[:4096]
    except OSError:
        return platform.processor() + platform.machine()


def _check_private(path: Path, what: str) -> None:
    """NativeUnavailable unless ``path`` belongs to this user and neither group nor others can write it."""
    info = path.stat()
    problem = (
        f"is owned by uid {info.st_uid}, not by this user (uid {os.getuid()})" if info.st_uid != os.getuid()
        else f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):#o})" if info.st_mode & 0o022
        else None
    )
    if problem:
        raise NativeUnavailable(
            f"refusing the kernel {what} {path}: it {problem}; anyone who can write it could run code here. "
            "Remove it, or set HF_TBN_CACHE to a folder only you can write"
        )


def _private_folder(folder: Path) -> Path:
    """``folder``, created ``0700`` if missing, checked private (:func:`_check_private`)."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise NativeUnavailable(f"cannot create the kernel cache folder {folder}: {err}") from err
    _check_private(folder, "cache folder")
    return folder


def _record(library: Path) -> Path:
    """The file holding the size and sha256 of ``library`` as built."""
    return library.with_name(library.name + ".sha256")


def _fingerprint(data: bytes) -> str:
    return f"{hashlib.sha256(data).hexdigest()} {len(data)}\n"


def _matches_build(library: Path) -> bool:
    """Whether ``library`` is exactly what the last build recorded (size first: nothing truncated is read in full)."""
    record = _record(library)
    if not (library.exists() and record.exists()):
        return False
    for path, what in ((library, "library"), (record, "checksum file")):
        _check_private(path, what)
    expected = record.read_text()
    fields = expected.split()
    if len(fields) != 2 or not fields[1].isdigit() or library.stat().st_size != int(fields[1]):
        return False
    return _fingerprint(library.read_bytes()) == expected


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary folder beside ``target``, then move the library and its record into place."""
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        errors = ""
        for extra in (("-fopenmp",), ()):  # OpenMP threads where the compiler has them
            command = [cc, *FLAGS, *extra, *map(str, SOURCES), "-o", str(out)]
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode == 0:
                record = _record(out)
                record.write_text(_fingerprint(out.read_bytes()))
                os.replace(out, target)  # atomic: concurrent builders never load a partial file
                os.replace(record, _record(target))
                return
            errors += proc.stderr
        raise NativeUnavailable(f"{cc} could not build {', '.join(s.name for s in SOURCES)}:\n{errors[-2000:]}")


@contextlib.contextmanager
def _build_lock(library: Path) -> Iterator[None]:
    """An exclusive lock on ``library``'s lock file: processes starting at once (DDP ranks, parallel tests)
    build it once, and none checks it while another replaces it."""
    fd = os.open(library.with_name(library.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def load(folder: Path) -> ctypes.CDLL:
    """The kernel from the private cache ``folder``, built or rebuilt there unless it matches its last build."""
    cc = _compiler()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    sources = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*sources, *FLAGS, cc, version, _cpu_signature()]).encode())
    target = _private_folder(folder) / f"tbn_lut-{key.hexdigest()[:16]}.so"
    with _build_lock(target):
        if not _matches_build(target):
            _build(cc, target)
            if not _matches_build(target):
                raise NativeUnavailable(f"{target} changed right after it was built (written by another user?)")
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.tbn_lut_linear.argtypes = [ptr, i64, i64, i64, ptr, i64, i64, ptr, i64, ptr, ptr, i64, ctypes.c_int]
    lib.tbn_lut_linear.restype = ctypes.c_int
    lib.int8_rows_linear.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ctypes.c_int]
    lib.int8_rows_linear.restype = None
    return lib


@functools.cache
def library() -> ctypes.CDLL:
    """The kernel from :func:`cache_dir`, built on first use; :class:`NativeUnavailable` says why it cannot be."""
    return load(cache_dir())


@functools.cache
def native_error() -> str | None:
    """Why the CPU kernel is unusable here, or None when it is built and loaded."""
    try:
        library()
    except (NativeUnavailable, OSError) as err:
        return str(err)
    return None


def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32, copied only when it is not (decoding calls the kernels ~200 times a token)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def tile_linear(
    x: torch.Tensor, tile: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None, rows: int, row0: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(M, p * rows)``: block ``i`` is ``alpha_i * x @ T.T`` (+ bias), ``T`` = tile rows ``row0 .. row0+rows``.

    CPU tensors; ``x`` is ``(M, K)`` with ``K % 8 == 0``, fp32/bf16/fp16 (computed in fp32);
    ``out`` an optional ``(M, p * rows)`` destination of ``x``'s dtype. No autograd (see
    :mod:`.backends`).
    """
    m, k = x.shape
    p = alpha.numel()
    if x.dtype not in DTYPES or x.device.type != "cpu":
        raise ValueError(f"native tile_linear: x must be a CPU tensor of {DTYPES}, got {x.dtype} on {x.device}")
    if k % 8:
        raise ValueError(f"native tile_linear: K must be a multiple of 8 (tile rows start on a byte), got K={k}")
    check_tile_operands("native tile_linear", x, tile, alpha, bias, rows, row0)
    if out is not None and (out.shape != (m, p * rows) or out.dtype != x.dtype):
        want, got = f"{x.dtype} {(m, p * rows)}", f"{out.dtype} {tuple(out.shape)}"
        raise ValueError(f"native tile_linear: out must be {want}, got {got}")
    x32, alpha32 = _float32(x), _float32(alpha)
    bias_ptr = None if bias is None else _float32(bias).data_ptr()
    direct = out is not None and out.dtype == torch.float32 and out.stride(1) == 1
    y = out if direct else torch.empty(m, p * rows)
    if not tile.is_contiguous():
        tile = tile.contiguous()
    status = library().tbn_lut_linear(
        x32.data_ptr(), m, k, k, tile.data_ptr(), rows, row0, alpha32.data_ptr(), p, bias_ptr, y.data_ptr(),
        y.stride(0), torch.get_num_threads(),
    )
    if status:
        raise RuntimeError(f"native tile_linear: {_ERRORS.get(status, f'status {status}')}")
    if out is None:
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    if not direct:
        out.copy_(y)
    return out


def int8_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``(M, N)`` float32: ``x @ (scale[:, None] * codes).T``, int8 ``codes`` ``(N, K)``, float32 ``scale`` ``(N,)``.

    The compressed heads' decoding path (``int8_rows.c``): float32 activations, the weight read
    once as int8. CPU tensors, no autograd.
    """
    m, k = x.shape
    n = codes.shape[0]
    if codes.dtype != torch.int8 or codes.shape != (n, k) or scale.dtype != torch.float32 or scale.shape != (n,):
        raise ValueError(f"native int8_linear: codes must be int8 (N, {k}) and scale float32 (N,), got codes "
                         f"{codes.dtype} {tuple(codes.shape)}, scale {scale.dtype} {tuple(scale.shape)}")
    x32, codes, scale = _float32(x), codes.contiguous(), scale.contiguous()
    y = torch.empty(m, n)
    library().int8_rows_linear(x32.data_ptr(), m, k, codes.data_ptr(), scale.data_ptr(), n, y.data_ptr(),
                               torch.get_num_threads())
    return y
