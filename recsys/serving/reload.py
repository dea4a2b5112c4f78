"""Hot swap of a model bundle: watch its location, load + verify + warm a new version in the
background, then swap it in; a bundle that fails any step is refused and the old one keeps serving.

What is watched is the directory the location resolves to (``current``'s target in the versioned
layout, see :mod:`recsys.bundle`) and its manifest's inode, size and mtime, polled every
``poll_s`` seconds. A new version is loaded from its resolved directory (so a ``current`` that
moves again meanwhile cannot mix two versions), verified (sizes, sha256, catalog), warmed up with
a real request, and only then handed to ``swap`` on the event loop: one reference assignment, so
each request sees the old model or the new one, never a mix. Health is not touched (it stays
SERVING). A refused version is not retried until the location changes again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter

from recsys.bundle import MANIFEST, resolve_bundle
from recsys.serving.metrics import bundle_info, get_or_create

log = logging.getLogger(__name__)

Model = TypeVar("Model")
BundleKey = tuple[str, int, int, int]


class Stoppable(Protocol):
    """What the watcher needs of a running server (``recsys.serving.bootstrap.RunningServer``)."""

    @property
    def stopping(self) -> bool: ...

    async def wait_for_termination(self) -> None: ...


def bundle_key(directory: Path) -> BundleKey | None:
    """What identifies the bundle in ``directory`` (a resolved bundle folder): its path and its
    manifest's inode, size and mtime; None while it has no manifest (being written)."""
    try:
        stat = (directory / MANIFEST).stat()
    except OSError:
        return None
    return (str(directory), stat.st_ino, stat.st_size, stat.st_mtime_ns)


async def load_bundle(location: Path, load: Callable[[Path], Model]) -> tuple[Model, BundleKey | None]:
    """Startup: ``load`` (in a thread) the bundle ``location`` names now; returns the model and
    its key (taken before loading, so a version published during the load is still noticed)."""
    directory = resolve_bundle(location)
    key = bundle_key(directory)
    return await asyncio.to_thread(load, directory), key


class ReloadMetrics:
    """``recsys_bundle_reload_total{service,outcome}``: outcome ``swapped`` or ``refused``."""

    def __init__(self, registry: CollectorRegistry, service: str):
        self.service = service
        self.reloads: Counter = get_or_create(
            registry,
            "recsys_bundle_reload",
            lambda: Counter(
                "recsys_bundle_reload",
                "New bundle versions seen at the bundle location: swapped in, or refused (corrupt, "
                "failed to load or warm up; the old one keeps serving)",
                ["service", "outcome"],
                registry=registry,
            ),
        )
        for outcome in ("swapped", "refused"):  # both series exist from the start (alerts read rate)
            self.reloads.labels(service, outcome)

    def count(self, outcome: str) -> None:
        self.reloads.labels(self.service, outcome).inc()


class BundleWatcher(Generic[Model]):
    """Keeps the served model in step with the bundle at ``location``.

    ``served`` is the key of the bundle served now (from :func:`load_bundle`);
    ``load(directory)`` (blocking, run in a thread) returns a verified model; ``warm(model)``
    runs one real request on it; ``swap(model)`` makes it the served one (called on the loop),
    after which ``recsys_bundle_info`` reports the model's ``version`` (when it has one).
    """

    def __init__(
        self,
        location: Path,
        service: str,
        load: Callable[[Path], Model],
        warm: Callable[[Model], Awaitable[None]],
        swap: Callable[[Model], None],
        registry: CollectorRegistry,
        poll_s: float,
        served: BundleKey | None = None,
    ):
        self.location = Path(location)
        self.service = service
        self.poll_s = poll_s
        self._load = load
        self._warm = warm
        self._swap = swap
        self._registry = registry
        self.metrics = ReloadMetrics(registry, service)
        self.key: BundleKey | None = served  # the served bundle
        self.refused_key: BundleKey | None = None  # the last refused one (not retried)
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def check(self) -> str | None:
        """One poll: swap in a new version if the location names one. Returns ``swapped``,
        ``refused`` or None (nothing new)."""
        directory = resolve_bundle(self.location)
        key = bundle_key(directory)
        if key is None or key == self.key or key == self.refused_key:
            return None
        started = time.perf_counter()
        try:
            model = await asyncio.to_thread(self._load, directory)
            await self._warm(model)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self.refused_key = key
            self.last_error = f"{type(error).__name__}: {error}"
            self.metrics.count("refused")
            log.error(
                "bundle %s refused; the old one keeps serving: %s",
                directory,
                self.last_error,
                extra={"service": self.service, "bundle": str(directory)},
            )
            return "refused"
        self._swap(model)
        version = getattr(model, "version", None)
        if version:
            bundle_info(self._registry, self.service, self.service, version)
        self.key, self.last_error = key, None
        self.metrics.count("swapped")
        log.info(
            "bundle %s swapped in (loaded, verified and warmed in %.3f s)",
            directory,
            time.perf_counter() - started,
            extra={"service": self.service, "bundle": str(directory)},
        )
        return "swapped"

    def start(self, running: Stoppable) -> None:
        """Poll every ``poll_s`` seconds (none when 0) until ``running`` stops."""
        if self.poll_s > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._watch(running))

    async def _watch(self, running: Stoppable) -> None:
        terminated = asyncio.ensure_future(running.wait_for_termination())
        try:
            while not running.stopping:
                done, _ = await asyncio.wait({terminated}, timeout=self.poll_s)
                if done or running.stopping:
                    return
                try:
                    await self.check()
                except Exception:  # e.g. the location vanished: keep serving, keep watching
                    log.exception("bundle watch of %s failed", self.location, extra={"service": self.service})
        finally:
            terminated.cancel()

    async def stop(self) -> None:
        """Stop watching (a load in progress finishes in its thread and is discarded)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
