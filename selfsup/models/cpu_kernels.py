"""selfsup's compiled CPU kernels: built from ``csrc/*.c`` on first use, loaded through ctypes.

Two small C files hold the memory-bound work of a CPU training step that torch runs as several passes:
``batchnorm.c`` (BatchNorm + ReLU + residual add, :mod:`selfsup.models.cpu_norm`) and ``winograd.c`` (the
F(4x4, 3x3) input and output transforms, :mod:`selfsup.models.cpu_conv`). They are compiled together with the
system C compiler (``$CC``, else ``cc`` or ``gcc``) and OpenMP, with ``-march=native`` for the CPU they run on,
about a second; the library is cached under ``$SELFSUP_CACHE`` (default ``~/.cache/selfsup``), keyed by the
sources, the compiler, the flags and the CPU, so a home directory shared by different machines is safe. The
library links ``libgomp.so.1``; where torch ships its OpenMP runtime under that name (Linux x86-64 wheels), the
kernels run on torch's own threads, and they take ``torch.get_num_threads()``. Builds whose runtime is renamed
or Intel's (some aarch64 wheels, conda) load the system libgomp beside it: correct, with a second thread pool.

Where no compiler is found or the build fails, :func:`kernels` warns once and returns ``None``, and callers use
torch's operators, with the same results.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from torch import Tensor

_SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.c"))
_FLAGS = ("-O3", "-march=native", "-fno-trapping-math", "-fopenmp", "-shared", "-fPIC")
_library: ctypes.CDLL | None | bool = False  # False: not tried yet; None: tried and unavailable

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {  # name: (argument types, return type)
    "bn_stats": ([_P, _P, _I64, _I64, _P, _P, _I32], _I32),
    "bn_forward": ([_P, _P, _P, _P, _P, _I64, _I64, _I32, _I32], None),
    "bn_backward_reduce": ([_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _P, _P, _I32], _I32),
    "bn_backward_input": ([_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32], None),
    "winograd4_input": ([_P, _I64, _I64, _I64, _I64, _P, _I32], None),
    "winograd4_output": ([_P, _I64, _I64, _I64, _I64, _P, _I32], None),
    "winograd4_output_adjoint": ([_P, _I64, _I64, _I64, _I64, _P, _I32], None),
}


def _cpu_signature() -> str:
    """What ``-march=native`` compiles for: the CPU model and its feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in info if line.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("SELFSUP_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "selfsup"
    return Path(root) / "kernels"


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _compile() -> Path:
    compiler = shlex.split(os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "")
    if not compiler:
        raise RuntimeError("no C compiler found (install gcc, or set CC)")
    parts = [source.read_bytes() for source in _SOURCES] + [" ".join(compiler).encode(), " ".join(_FLAGS).encode(),
                                                             _cpu_signature().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    target = _cache_dir() / f"selfsup-{key}.so"
    checksum = target.with_suffix(".sha256")
    # a library is used only with the checksum written after it: a truncated or foreign file is rebuilt,
    # never loaded (a truncated shared library crashes the process that maps it)
    if target.exists() and checksum.exists() and checksum.read_text().strip() == _digest(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".selfsup-", suffix=".so", dir=target.parent)
    os.close(fd)
    fd, tmp_sum = tempfile.mkstemp(prefix=".selfsup-", suffix=".sha256", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([*compiler, *_FLAGS, "-o", tmp, *map(str, _SOURCES), "-lm"], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(compiler)} failed: {done.stderr.strip()[-2000:]}")
        if not Path(tmp).read_bytes()[:4] == b"\x7fELF":
            raise RuntimeError(f"{' '.join(compiler)} wrote no shared library")
        Path(tmp_sum).write_text(_digest(Path(tmp)))
        os.replace(tmp, target)  # atomic: processes building at once each install a whole file
        os.replace(tmp_sum, checksum)
    finally:
        for leftover in (tmp, tmp_sum):
            if os.path.exists(leftover):
                os.remove(leftover)
    return target


def _load(path: Path) -> ctypes.CDLL:
    library = ctypes.CDLL(str(path))
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = arguments, result
    return library


def kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; ``None`` (with one warning) where they cannot be built."""
    global _library
    if _library is False:
        try:
            _library = _load(_compile())
        except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as error:
            warnings.warn(f"selfsup: compiled CPU kernels unavailable, fused BatchNorm and Winograd transforms use "
                          f"torch's operators ({error})", RuntimeWarning, stacklevel=2)
            _library = None
    return _library


def ptr(t: Tensor | None) -> int | None:
    """The address a kernel reads or writes; keep ``t`` referenced until the call returns."""
    return None if t is None else t.data_ptr()
