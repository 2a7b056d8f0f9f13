"""The CPU's C kernels (kernels/*.c: gq.c's quantized-weight products, fused.c's decode ops): built for this machine
on first use and loaded with ctypes.

The sources are compiled together by the system's C compiler (`cc`, or $CC; -O3 -march=native, OpenMP) into
~/.cache/shardserve/kernels, keyed by the sources, the flags, the compiler and this CPU's flags, so a cluster
sharing a home directory never loads a build made for another CPU. Where no compiler works, `library()` is None
and the CPU table keeps torch's ops and ATen's int4 kernel (cpu.py), saying so once in the log. OpenMP resolves to
the libgomp torch loaded (one thread pool in the process).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = tuple(sorted(Path(__file__).with_name("kernels").glob("*.c")))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
P, I64, INT, FLOAT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "shardserve" / "kernels"


@functools.cache
def library(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL | None:
    """The built library (compiled once per sources, flags, compiler and CPU), or None where no C compiler builds
    it. Callers declare the argument types of what they call (`declare`)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        log.warning("no C compiler (cc) found: the CPU keeps torch's ops and ATen's int4 kernel")
        return None
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    parts = [s.read_text() for s in SOURCES] + [*flags, version, _cpu_flags()]
    target = cache_dir() / f"shardserve-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, flags, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.CalledProcessError) as e:  # OSError: no room, read-only cache, an unloadable file
        stderr = getattr(e, "stderr", "") or ""
        log.warning("building %s failed (%s): the CPU keeps torch's ops and ATen's int4 kernel\n%s", target, e, stderr)
        return None


def declare(lib: ctypes.CDLL, signatures: dict[str, list], restype=None) -> None:
    """Argument types of the library's functions (all returning `restype`)."""
    for name, args in signatures.items():
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = restype


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), platform.machine())


def _build(compiler: str, flags: tuple[str, ...], target: Path) -> None:
    """Compile to a temporary name beside the target, then rename: ranks of one machine build at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [compiler, *flags, "-o", str(out), *map(str, SOURCES), "-lm"]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        os.replace(out, target)
