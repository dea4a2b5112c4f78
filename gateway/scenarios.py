"""Scenario configuration: each scenario is a pipeline of stages declared in YAML.

A scenario is ``recall -> [rank] -> [rerank]``. Every stage declares what it *needs* and what it
*produces* (see :data:`STAGE_KEYS`); :func:`load_scenarios` walks each pipeline in order and
rejects, at load time, a stage that needs something no earlier stage (or the request) provides,
naming the scenario and the stage. Request fields a scenario cannot work without (a seed item, a
category) are derived from the stages, so the servicer validates requests from the same config.

:class:`ScenarioRegistry` holds the live config and reloads it when the file changes (mtime
polling) or on demand (SIGHUP); an invalid new file is logged and the previous config is kept.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gateway.rerank import (
    DiversityRule,
    DropPurchasedRule,
    ExcludeContextRule,
    RerankRule,
    RevenueRule,
)
from recsys.sources import RECALL_SOURCES

log = logging.getLogger(__name__)

# Where recall's seed items may come from, tried in the declared order (first non-empty wins).
SEED_SOURCES = ("context.item_ids", "history.cart", "history.recent")
# Request inputs every stage may read. Some are only *required* if a stage cannot do without them.
REQUEST_KEYS = frozenset({"user_id", "history", "context.item_ids", "context.category"})
# The request fields a scenario can make mandatory (history is always present, possibly empty).
REQUIRABLE_FIELDS = frozenset({"user_id", "context.item_ids", "context.category"})
MAX_NUM_ITEMS = 500


class ScenarioConfigError(ValueError):
    """The scenario file is invalid; the message names the scenario, stage and field."""


@dataclass(frozen=True)
class RecallStage:
    """Ask the recall service for ``k`` candidates from the named sources."""

    sources: tuple[tuple[str, int], ...]  # (source, quota) in declared order; () = recall's default mix
    k: int
    seeds: tuple[str, ...] = ()  # seed sources for i2i/covisit, first non-empty wins
    exclude_history: bool = False
    exclude_context: bool = False  # pass context.item_ids as exclude_item_ids
    category_from_context: bool = False  # restrict to context.category
    sponsored_only: bool = False
    timeout_ms: float = 150.0

    kind = "recall"

    def needs(self) -> tuple[set[str], set[str]]:
        """(required, optional) keys this stage reads."""
        required: set[str] = set()
        optional = {"history", "user_id"}
        if len(self.seeds) == 1 and self.seeds[0] == "context.item_ids":
            required.add("context.item_ids")
        elif "context.item_ids" in self.seeds:
            optional.add("context.item_ids")
        if self.exclude_context:
            optional.add("context.item_ids")
        if self.category_from_context:
            required.add("context.category")
        return required, optional

    def produces(self) -> set[str]:
        produced = {"candidates", "attributes"}
        if self.sponsored_only:
            produced.add("bids")
        return produced


@dataclass(frozen=True)
class RankStage:
    """Score the first ``max_candidates`` recall candidates with the ranker."""

    max_candidates: int
    timeout_ms: float = 150.0

    kind = "rank"

    def needs(self) -> tuple[set[str], set[str]]:
        return {"candidates"}, {"history", "user_id"}

    def produces(self) -> set[str]:
        return {"rank_scores"}


@dataclass(frozen=True)
class RerankStage:
    """Business rules applied in order to the ranked list (in the gateway)."""

    rules: tuple[RerankRule, ...]

    kind = "rerank"

    def needs(self) -> tuple[set[str], set[str]]:
        required: set[str] = set()
        for rule in self.rules:
            required |= set(rule.needs)
        optional = (
            {"context.item_ids"} if any(isinstance(r, ExcludeContextRule) for r in self.rules) else set()
        )
        return required, optional

    def produces(self) -> set[str]:
        return set()


Stage = RecallStage | RankStage | RerankStage


@dataclass(frozen=True)
class Scenario:
    """One scenario: its pipeline, budgets and the request fields it requires."""

    name: str
    stages: tuple[Stage, ...]
    personalised: bool = True
    model_scenario: str = ""  # the scenario name the models know (defaults to ``name``)
    timeout_ms: float = 300.0  # total budget when the caller's deadline is longer or absent
    default_num_items: int = 20
    required_fields: frozenset[str] = field(default_factory=frozenset)

    @property
    def recall(self) -> RecallStage:
        return next(s for s in self.stages if isinstance(s, RecallStage))

    @property
    def rank(self) -> RankStage | None:
        return next((s for s in self.stages if isinstance(s, RankStage)), None)

    @property
    def rerank(self) -> RerankStage | None:
        return next((s for s in self.stages if isinstance(s, RerankStage)), None)

    @property
    def model_scenario_name(self) -> str:
        return self.model_scenario or self.name


@dataclass(frozen=True)
class ScenarioSet:
    """All scenarios of one config file, plus a short digest that identifies the file's content."""

    scenarios: Mapping[str, Scenario]
    digest: str
    popular_cache_size: int = 1000
    popular_refresh_s: float = 60.0

    def get(self, name: str) -> Scenario | None:
        return self.scenarios.get(name)


# ---------------------------------------------------------------------------------------------
# Parsing


def _where(scenario: str, stage: str | None = None) -> str:
    return f"scenario {scenario!r}" + (f", stage {stage!r}" if stage else "")


def _fields(obj: Any, where: str, allowed: set[str]) -> Mapping[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ScenarioConfigError(f"{where}: expected a mapping, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise ScenarioConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    return obj


def _int(value: Any, where: str, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ScenarioConfigError(f"{where}: {name} must be an integer in {low}..{high}, got {value!r}")
    return value


def _number(value: Any, where: str, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ScenarioConfigError(f"{where}: {name} must be a number in {low}..{high}, got {value!r}")
    return float(value)


def _bool(value: Any, where: str, name: str) -> bool:
    if not isinstance(value, bool):
        raise ScenarioConfigError(f"{where}: {name} must be true or false, got {value!r}")
    return value


def _parse_recall(spec: Any, where: str) -> RecallStage:
    spec = _fields(spec, where, {"sources", "k", "seeds", "filters", "timeout_ms"})
    sources_spec = spec.get("sources", "default")
    sources = []
    if sources_spec != "default":  # "default": the recall bundle's own source mix for the scenario
        if not isinstance(sources_spec, Mapping) or not sources_spec:
            raise ScenarioConfigError(
                f"{where}: sources must map source -> quota (e.g. {{u2i: 200}}) or be 'default'"
            )
        for source, quota in sources_spec.items():
            if source not in RECALL_SOURCES:
                raise ScenarioConfigError(
                    f"{where}: unknown source {source!r}; known: {list(RECALL_SOURCES)}"
                )
            sources.append((source, _int(quota, where, f"sources.{source}", 1, 10_000)))
    if "k" not in spec and not sources:
        raise ScenarioConfigError(f"{where}: k is required with the default sources")
    k = _int(spec.get("k", sum(q for _, q in sources)), where, "k", 1, 10_000)
    seeds_spec = spec.get("seeds", [])
    if not isinstance(seeds_spec, str | list):
        raise ScenarioConfigError(
            f"{where}: seeds must be one of {list(SEED_SOURCES)} or a list of them, got {seeds_spec!r}"
        )
    seeds = (seeds_spec,) if isinstance(seeds_spec, str) else tuple(seeds_spec)
    for seed in seeds:
        if seed not in SEED_SOURCES:
            raise ScenarioConfigError(f"{where}: unknown seeds {seed!r}; known: {list(SEED_SOURCES)}")
    if "i2i" in dict(sources) and not seeds:
        raise ScenarioConfigError(
            f"{where}: source i2i needs seed items: set seeds (e.g. [context.item_ids])"
        )
    filters = _fields(
        spec.get("filters"),
        f"{where}, filters",
        {"exclude_history", "exclude_context", "category", "sponsored_only"},
    )
    category = filters.get("category")
    if category not in (None, "context"):
        raise ScenarioConfigError(f"{where}: filters.category must be 'context' (the request's category)")
    return RecallStage(
        sources=tuple(sources),
        k=k,
        seeds=seeds,
        exclude_history=_bool(filters.get("exclude_history", False), where, "filters.exclude_history"),
        exclude_context=_bool(filters.get("exclude_context", False), where, "filters.exclude_context"),
        category_from_context=category == "context",
        sponsored_only=_bool(filters.get("sponsored_only", False), where, "filters.sponsored_only"),
        timeout_ms=_number(spec.get("timeout_ms", 150), where, "timeout_ms", 1, 60_000),
    )


def _parse_rank(spec: Any, where: str) -> RankStage:
    spec = _fields(spec, where, {"max_candidates", "timeout_ms"})
    return RankStage(
        max_candidates=_int(spec.get("max_candidates", 300), where, "max_candidates", 1, 5000),
        timeout_ms=_number(spec.get("timeout_ms", 150), where, "timeout_ms", 1, 60_000),
    )


def _parse_rule(spec: Any, where: str) -> RerankRule:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ScenarioConfigError(f"{where}: each rule is a one-key mapping, e.g. {{diversity: {{...}}}}")
    ((name, body),) = spec.items()
    rule_where = f"{where}, rule {name!r}"
    if name == "diversity":
        body = _fields(body, rule_where, {"top_n", "max_per_category", "max_per_brand"})
        per_category = body.get("max_per_category")
        per_brand = body.get("max_per_brand")
        if per_category is None and per_brand is None:
            raise ScenarioConfigError(f"{rule_where}: set max_per_category and/or max_per_brand")
        return DiversityRule(
            top_n=_int(body.get("top_n", 20), rule_where, "top_n", 1, MAX_NUM_ITEMS),
            max_per_category=None
            if per_category is None
            else _int(per_category, rule_where, "max_per_category", 1, MAX_NUM_ITEMS),
            max_per_brand=None
            if per_brand is None
            else _int(per_brand, rule_where, "max_per_brand", 1, MAX_NUM_ITEMS),
        )
    if name == "drop_purchased":
        body = _fields(body, rule_where, {"days"})
        return DropPurchasedRule(days=_number(body.get("days"), rule_where, "days", 0, 36_500))
    if name == "exclude_context":
        if body not in (None, True):
            raise ScenarioConfigError(f"{rule_where}: takes no settings (write `exclude_context: true`)")
        return ExcludeContextRule()
    if name == "revenue":
        body = _fields(body, rule_where, {"floor"})
        return RevenueRule(floor=_number(body.get("floor", 0.0), rule_where, "floor", 0, 1e9))
    raise ScenarioConfigError(
        f"{where}: unknown rule {name!r}; known: diversity, drop_purchased, exclude_context, revenue"
    )


def _parse_stage(spec: Any, scenario: str, index: int) -> Stage:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ScenarioConfigError(
            f"{_where(scenario)}: stages[{index}] must be a one-key mapping (recall:, rank: or rerank:)"
        )
    ((kind, body),) = spec.items()
    where = _where(scenario, kind)
    if kind == "recall":
        return _parse_recall(body, where)
    if kind == "rank":
        return _parse_rank(body, where)
    if kind == "rerank":
        if not isinstance(body, list) or not body:
            raise ScenarioConfigError(f"{where}: expected a non-empty list of rules")
        return RerankStage(rules=tuple(_parse_rule(rule, where) for rule in body))
    raise ScenarioConfigError(
        f"{_where(scenario)}: stages[{index}]: unknown stage {kind!r} (recall, rank, rerank)"
    )


def check_pipeline(name: str, stages: tuple[Stage, ...]) -> frozenset[str]:
    """Check that each stage's needs are met by the request or an earlier stage.

    Returns the request fields the scenario requires. Raises :class:`ScenarioConfigError`
    naming the scenario and the first stage that does not fit.
    """
    if not stages:
        raise ScenarioConfigError(f"{_where(name)}: no stages")
    available: set[str] = set(REQUEST_KEYS)
    required_fields: set[str] = set()
    seen_kinds: set[str] = set()
    for stage in stages:
        where = _where(name, stage.kind)
        if stage.kind in seen_kinds:
            raise ScenarioConfigError(
                f"{where}: appears twice; a pipeline has at most one stage of each kind"
            )
        seen_kinds.add(stage.kind)
        required, _optional = stage.needs()
        missing = sorted(required - available)
        if missing:
            producers = {
                "candidates": "a recall stage",
                "attributes": "a recall stage",
                "rank_scores": "a rank stage",
                "bids": "a recall stage with filters.sponsored_only: true",
            }
            hints = "; ".join(f"{key} comes from {producers.get(key, 'the request')}" for key in missing)
            raise ScenarioConfigError(f"{where}: needs {missing}, which no earlier stage produces ({hints})")
        required_fields |= required & REQUIRABLE_FIELDS
        available |= stage.produces()
    if "candidates" not in available:
        raise ScenarioConfigError(f"{_where(name)}: no recall stage produces candidates")
    return frozenset(required_fields)


def _parse_scenario(name: str, spec: Any, defaults: Mapping[str, Any]) -> Scenario:
    where = _where(name)
    spec = _fields(spec, where, {"stages", "personalised", "model_scenario", "timeout_ms", "num_items"})
    stages_spec = spec.get("stages")
    if not isinstance(stages_spec, list):
        raise ScenarioConfigError(f"{where}: stages must be a list")
    stages = tuple(_parse_stage(stage, name, i) for i, stage in enumerate(stages_spec))
    required = set(check_pipeline(name, stages))
    personalised = _bool(spec.get("personalised", defaults.get("personalised", True)), where, "personalised")
    if personalised:
        required.add("user_id")
    model_scenario = spec.get("model_scenario", "")
    if not isinstance(model_scenario, str):
        raise ScenarioConfigError(f"{where}: model_scenario must be a string")
    return Scenario(
        name=name,
        stages=stages,
        personalised=personalised,
        model_scenario=model_scenario,
        timeout_ms=_number(
            spec.get("timeout_ms", defaults.get("timeout_ms", 300)), where, "timeout_ms", 1, 600_000
        ),
        default_num_items=_int(
            spec.get("num_items", defaults.get("num_items", 20)), where, "num_items", 1, MAX_NUM_ITEMS
        ),
        required_fields=frozenset(required),
    )


def parse_scenarios(document: Any, digest: str = "") -> ScenarioSet:
    """Build a :class:`ScenarioSet` from a parsed YAML document, validating everything."""
    top = _fields(document, "scenario config", {"version", "defaults", "popular_cache", "scenarios"})
    if top.get("version", 1) != 1:
        raise ScenarioConfigError(f"scenario config: unsupported version {top.get('version')!r} (expected 1)")
    defaults = _fields(top.get("defaults"), "defaults", {"personalised", "timeout_ms", "num_items"})
    popular = _fields(top.get("popular_cache"), "popular_cache", {"size", "refresh_s"})
    scenarios_spec = top.get("scenarios")
    if not isinstance(scenarios_spec, Mapping) or not scenarios_spec:
        raise ScenarioConfigError("scenario config: `scenarios` must map names to scenarios")
    scenarios = {}
    for name, spec in scenarios_spec.items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum():
            raise ScenarioConfigError(
                f"scenario config: bad scenario name {name!r} (letters, digits, _ and -)"
            )
        scenarios[name] = _parse_scenario(name, spec, defaults)
    return ScenarioSet(
        scenarios=scenarios,
        digest=digest,
        popular_cache_size=_int(popular.get("size", 1000), "popular_cache", "size", 1, 10_000),
        popular_refresh_s=_number(popular.get("refresh_s", 60), "popular_cache", "refresh_s", 0.1, 86_400),
    )


def load_scenarios(path: str | Path) -> ScenarioSet:
    """Read and validate a scenario YAML file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ScenarioConfigError(f"cannot read scenario config {path}: {error}") from error
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ScenarioConfigError(f"{path}: invalid YAML: {error}") from error
    try:
        return parse_scenarios(document, hashlib.sha256(raw).hexdigest()[:12])
    except ScenarioConfigError as error:
        raise ScenarioConfigError(f"{path}: {error}") from error


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
