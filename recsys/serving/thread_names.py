"""Kernel-visible names for the services' own threads.

Python's thread names live only inside the interpreter: ``top -H``, ``ps -L``, ``/proc/<pid>/task``
and the benchmarks that read them see every thread of a service as ``python``. The threads that do
a service's work name themselves with :func:`name_os_thread` when they start (``recall-batch``,
``rank-batch``, ``ann-quality``, ``metrics-http``), so an operator and ``recsys bench e2e`` can tell
a batch thread from the event loop (the process's main thread) and gRPC's own threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

PR_SET_NAME = 15  # prctl option: the calling thread's name (/proc/self/task/<tid>/comm)
MAX_NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating NUL

_libc: ctypes.CDLL | None = None


def _prctl() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    global _libc
    if not sys.platform.startswith("linux"):
        return None
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            return None
    return getattr(_libc, "prctl", None)


def os_thread_name(name: str) -> bytes:
    """``name`` as the kernel keeps it: ASCII (others replaced by ``?``), at most 15 bytes."""
    return name.encode("ascii", "replace")[:MAX_NAME_BYTES]


def name_os_thread(name: str | None = None) -> bool:
    """Give the calling thread ``name`` (default: its Python name) in the kernel; True if set.
    A no-op returning False off Linux or where libc has no ``prctl``."""
    prctl = _prctl()
    if prctl is None:
        return False
    encoded = os_thread_name(name if name is not None else threading.current_thread().name)
    return prctl(PR_SET_NAME, ctypes.c_char_p(encoded), 0, 0, 0) == 0
