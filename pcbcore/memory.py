"""Keep freed memory in the process instead of handing it back to the OS after every block.

A streamed merge allocates the same few block-sized temporaries (tens of MB each) for every block. glibc
serves allocations above its mmap threshold with fresh mappings and unmaps them on free, so each block
page-faults all of its temporaries in again: a 477M-parameter linear merge took 2.2M page faults and 8 s
of system time out of 11 s; TIES 10M faults and 27 s out of 35 s. Two remedies, both speed only:

- `keep_freed_memory()`: raise the mmap threshold to 32 MB (glibc's ceiling when set at run time) and the
  trim threshold, so temporaries up to 32 MB are reused from the heap. The engine calls it before merging.
- `restart_with_malloc_settings(args)`: glibc takes higher thresholds from the environment at start-up
  only, so the `pcbmerge` command re-executes itself once (same pid) with MALLOC_MMAP_THRESHOLD_ at 1 GB
  (and one malloc arena for all threads) for the commands that merge; the variables are then dropped from
  `os.environ`, so processes it starts (servers, workers) keep glibc's defaults. Measured at 477M: linear 10.7 → 6.2 s, TIES 35.6 → 21.1 s.
  `PCBMERGE_MALLOC_TUNING=0` turns it off. Elsewhere than Linux with glibc both do nothing.
- `bound_resident_memory()`: between tensors, malloc_trim once the process holds more than 2 GiB, as
  freed temporaries of many sizes fragment the heap over hundreds of tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import platform
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
RUN_TIME_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for mallopt on 64-bit (HEAP_MAX_SIZE / 2)

# MALLOC_ARENA_MAX: one arena for every thread, so the mask threads of TIES's sort simulations reuse the main
# heap's freed memory instead of each growing (and faulting in) an arena of its own: peak RSS of a 477M TIES
# merge in mergekit's order 3.3 → 2.5 GiB.
START_UP_SETTINGS = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 32), "MALLOC_TOP_PAD_": str(64 << 20), "MALLOC_ARENA_MAX": "1"}
ADDED = "PCBMERGE_MALLOC_ADDED"  # the settings this process added to its own environment before re-executing
SWITCH = "PCBMERGE_MALLOC_TUNING"

_tuned = False
_libc = None
# Above this resident size, `bound_resident_memory` hands the heap's free pages back (see there).
RESIDENT_LIMIT = 2 << 30
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _tuning_on() -> bool:
    return _glibc() and os.environ.get(SWITCH, "1") != "0"


def _c_library():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    return _libc


def bound_resident_memory(limit: int | None = None) -> None:
    """Between tensors: when the process holds more than `limit` bytes (default RESIDENT_LIMIT), return the
    heap's free pages to the OS with malloc_trim. With the thresholds raised, freed temporaries of varying
    sizes fragment the heap over hundreds of tensors (a 1.5B model-scope PCB merge grew to 8 GiB); trimming
    when past the limit keeps the footprint bounded and costs one round of page faults each time. (glibc's
    default dynamic threshold fragments too: the same merge untuned passed 3.8 GiB within its first pass.)"""
    if not _glibc():
        return
    try:
        with open("/proc/self/statm") as f:
            resident = int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return
    if resident > (limit or RESIDENT_LIMIT) and _c_library():
        _c_library().malloc_trim(0)


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process for block-sized temporaries; True where it took effect."""
    global _tuned
    if _tuned or not _tuning_on():
        return _tuned
    libc = _c_library()
    mallopt = getattr(libc, "mallopt", None) if libc else None
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        _tuned = True  # set at start-up already, maybe higher than mallopt may set
        return _tuned
    _tuned = all(
        mallopt(option, value) == 1
        for option, value in ((M_MMAP_THRESHOLD, RUN_TIME_MMAP_THRESHOLD_MAX), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20), (M_ARENA_MAX, 1))
    )
    return _tuned


def restart_with_malloc_settings(module: str, args: list[str]) -> None:
    """Re-execute `python -m module args` with glibc's start-up malloc settings, once; after the restart,
    remove them from `os.environ` again (glibc has read them)."""
    global _tuned
    added = os.environ.pop(ADDED, None)
    if added is not None:
        for key in filter(None, added.split(",")):
            os.environ.pop(key, None)
        _tuned = True  # a later mallopt would only lower the threshold
        return
    if not _tuning_on():
        return
    missing = {key: value for key, value in START_UP_SETTINGS.items() if key not in os.environ}
    if not missing:
        return
    env = {**os.environ, **missing, ADDED: ",".join(missing)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *args], env)
