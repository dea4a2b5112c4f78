"""The gateway's live scenario config (:class:`ScenarioRegistry`): the file compiled by
:mod:`recsys.scenario.config`, reloaded when it changes (mtime polling) or on demand (SIGHUP); an
invalid new file is logged and the previous config is kept."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from recsys.scenario.config import ScenarioSet, load_scenarios
from recsys.scenario.spec import ScenarioConfigError

log = logging.getLogger(__name__)


class ScenarioRegistry:
    """The live scenario config: reloaded when the file changes; a bad file keeps the old config.

    A failed reload (an invalid file, or any unexpected error while loading) never stops the
    watcher: the error is logged, kept in ``last_error`` and passed to ``on_error`` (the gateway
    counts it in ``recsys_scenario_reload_errors_total``), and the next valid edit is applied.
    """

    def __init__(
        self,
        path: str | Path,
        poll_interval_s: float = 2.0,
        on_reload: Callable[[ScenarioSet], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        self.path = Path(path)
        self.poll_interval_s = poll_interval_s
        self.on_reload = on_reload
        self.on_error = on_error
        self.current = load_scenarios(self.path)  # a bad file at start-up is fatal
        self._mtime = self._stat()
        self.last_error: str | None = None

    def _stat(self) -> tuple[float, int] | None:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime, stat.st_size

    def reload(self) -> bool:
        """Reload now; returns True when a new config was installed, False when it was rejected
        (any error while loading rejects it: see the class docstring)."""
        self._mtime = self._stat()
        try:
            candidate = load_scenarios(self.path)
        except Exception as error:  # not only ScenarioConfigError: a loader bug must not stop reloads
            self._failed(error)
            return False
        self.last_error = None
        if candidate.digest != self.current.digest:
            log.info("scenario config reloaded: %s -> %s", self.current.digest, candidate.digest)
        self.current = candidate
        if self.on_reload is not None:
            self.on_reload(candidate)
        return True

    def reload_if_changed(self) -> bool | None:
        """Reload when the file's mtime or size changed; None when unchanged."""
        if self._stat() == self._mtime:
            return None
        return self.reload()

    def _failed(self, error: Exception) -> None:
        expected = isinstance(error, ScenarioConfigError)  # its message names the file and field
        message = str(error) if expected else f"{self.path}: {type(error).__name__}: {error}"
        self.last_error = message
        log.error(
            "scenario config reload failed, serving version %s: %s",
            self.current.digest,
            message,
            exc_info=not expected,
        )
        if self.on_error is not None:
            try:
                self.on_error(message)
            except Exception:
                log.exception("scenario reload error callback failed")

    async def watch(self) -> None:
        """Poll the file until cancelled; no error ends the loop (see the class docstring)."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                self.reload_if_changed()
            except Exception as error:  # e.g. the on_reload callback: keep watching
                self._failed(error)
