"""Kernel-visible names for the services' own threads.

Python's thread names live only inside the interpreter: ``top -H``, ``ps -L``, ``/proc/<pid>/task``
and the benchmarks that read them see every thread of a service as ``python``. The threads that do
a service's work name themselves with :func:`name_os_thread` when they start (``recall-batch``,
``rank-batch``, ``ann-quality``, ``metrics-http``), so an operator and ``recsys bench e2e`` can tell
a batch thread from the event loop (the process's main thread) and gRPC's own threads.
"""

from __future__ import annotations

import ctypes
import functools
import sys
import threading
from collections.abc import Callable

PR_SET_NAME = 15  # prctl option: the calling thread's name (/proc/self/task/<tid>/comm)
MAX_NAME_BYTES = 15  # the kernel keeps 16 bytes with the terminating NUL


@functools.cache
def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` (through the symbols already loaded in this process), None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


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
