"""Keep freed memory in the process: glibc ``malloc`` tuning for PyTorch on CPU.

glibc serves every block above its *mmap threshold* (128 KiB, adapting up to 32 MiB)
with a fresh ``mmap`` and gives it back to the operating system on ``free``; it also
trims the top of the heap once more than its *trim threshold* is free there. A CNN
forward on CPU allocates and frees the same large activations for every batch, so each
of them is paid for again in page faults (the kernel zeroes every 4 KiB page on first
touch). On a 2-core VM this made the EfficientNet-Lite0 forward about 2.5x slower than
it needs to be (``python -m benchmarks cpu`` measures it side by side).

:func:`tune_allocator` raises both thresholds at run time through ``mallopt`` (no
restart needed): large blocks then come from the heap and are reused by the next batch.
The cost is that the process keeps, until it exits, the memory its largest batch needed
(as jemalloc and tcmalloc do). It is applied once by ``python -m retrieval_lib`` and by
:func:`retrieval_lib.book.session.start`; set ``RETRIEVAL_ALLOCATOR=system`` to keep
glibc's defaults (e.g. to measure the difference). Other programs get the same effect
without this module through the environment, set before Python starts::

    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 python ...

or by preloading another allocator (``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2``
or ``libtcmalloc.so``). When either is in place, :func:`tune_allocator` leaves it alone.
Nothing is changed on macOS, Windows or Linux without glibc (musl).
"""
from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["tune_allocator", "allocator_state", "mallinfo", "ENV_VAR", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

logger = logging.getLogger("retrieval_lib")

ENV_VAR = "RETRIEVAL_ALLOCATOR"
_CHOICES = ("tuned", "system")
# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap (a Lite0 batch of 8 at 1024 px needs a few hundred
# MB per activation); larger ones are still mapped and unmapped. mallopt takes a C int,
# so 2 GiB - 1 is the largest trim threshold it accepts.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1
# environment variables (and the tunables string) through which glibc is already set up
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")

_state: dict | None = None


def _glibc():
    """``ctypes`` handle of the running glibc, or None (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"; unknown on musl
    except (ValueError, OSError, AttributeError):
        return None
    if not version or not version.startswith("glibc"):
        return None
    try:
        return ctypes.CDLL(None)  # the symbols of the running process: its libc
    except OSError:
        return None


def _choice() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower() or "tuned"
    if value not in _CHOICES:
        raise ValueError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not understood; set it to 'system' to keep "
                         f"glibc's malloc defaults, or to 'tuned' (or leave it unset) for the faster "
                         f"settings")
    return value


def _decide() -> dict:
    choice = _choice()  # a bad value is an error on every platform
    libc = _glibc()
    base = {"tuned": False, "mmap_threshold": None, "trim_threshold": None}
    if libc is None:
        return base | {"reason": f"no glibc on this platform ({sys.platform}): malloc left as it is"}
    if choice == "system":
        return base | {"reason": f"glibc malloc defaults kept ({ENV_VAR}=system)"}
    preload = os.environ.get("LD_PRELOAD", "")
    other = next((a for a in _OTHER_ALLOCATORS if a in preload), None)
    if other is not None:
        return base | {"reason": f"{other} is preloaded (LD_PRELOAD): malloc left to it"}
    set_by_env = [v for v in _GLIBC_ENV if v in os.environ and (v != "GLIBC_TUNABLES" or "malloc" in os.environ[v])]
    if set_by_env:
        return base | {"reason": f"glibc malloc already configured by {', '.join(set_by_env)}: left as it is"}
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not (ok_mmap and ok_trim):
        return base | {"reason": "glibc's mallopt refused the thresholds (mmap: "
                                 f"{'ok' if ok_mmap else 'refused'}, trim: {'ok' if ok_trim else 'refused'})"}
    return {"tuned": True, "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD,
            "reason": f"glibc malloc keeps freed blocks up to {MMAP_THRESHOLD >> 20} MiB for reuse "
                      f"(faster CPU forward; {ENV_VAR}=system turns this off)"}


def tune_allocator() -> dict:
    """Raise glibc's mmap and trim thresholds once per process; return what was done.

    Returns a dict: ``tuned`` (bool), ``reason`` (one sentence), ``mmap_threshold`` and
    ``trim_threshold`` (bytes, or None when nothing was set). Calling it again returns
    the first call's answer and changes nothing. Nothing is changed when
    ``RETRIEVAL_ALLOCATOR=system``, off glibc, when jemalloc/tcmalloc/mimalloc is
    preloaded, or when the ``MALLOC_*_THRESHOLD_`` / ``GLIBC_TUNABLES`` environment
    variables already set glibc up. The outcome is logged once (logger
    ``"retrieval_lib"``, level INFO).

    Raises:
        ValueError: ``RETRIEVAL_ALLOCATOR`` is set to something other than ``tuned`` or
            ``system``.
    """
    global _state
    if _state is None:
        _state = _decide()
        logger.info("allocator: %s", _state["reason"])
    return dict(_state)


def allocator_state() -> dict | None:
    """What :func:`tune_allocator` did in this process, or None when it has not run."""
    return None if _state is None else dict(_state)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def mallinfo() -> dict | None:
    """glibc's ``mallinfo2()`` counters as a dict (bytes and block counts), or None off glibc.

    ``arena``: bytes of the main heap; ``hblks`` / ``hblkhd``: number and bytes of the
    blocks served by ``mmap``; ``uordblks`` / ``fordblks``: bytes in use / free in the
    heap. Needs glibc >= 2.33 (None before).
    """
    libc = _glibc()
    fn = getattr(libc, "mallinfo2", None) if libc is not None else None
    if fn is None:
        return None
    fn.restype = _Mallinfo2
    info = fn()
    return {name: int(getattr(info, name)) for name, _ in _Mallinfo2._fields_}
