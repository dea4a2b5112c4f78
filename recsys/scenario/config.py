"""The scenario file compiled: each scenario is a graph of stages run in order.

A scenario is a recall stage, then optionally rank and re-rank rules, each stage one class of
:mod:`recsys.scenario.stages`. Every stage declares what it *needs* and what it *produces*;
:func:`load_scenarios` walks each pipeline in order and rejects, at load time, a stage that needs
something no earlier stage (or the request) provides, naming the scenario and the stage. Request
fields a scenario cannot work without (a seed item, a category) are derived from the stages, so
the gateway validates requests from the same config. The same compiled scenario runs in the
gateway, in ``recsys eval --scenario`` and when the ranker's training lists are built.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recsys.scenario.experiments import Arm, Experiment
from recsys.scenario.spec import (
    MAX_NUM_ITEMS,
    ScenarioConfigError,
    boolean,
    fields,
    integer,
    number,
    where,
)
from recsys.scenario.stages import STAGES, RankStage, RecallStage, RerankStage, Stage

# The shipped scenario file (gateway --scenarios / RECSYS_SCENARIOS, recsys eval --scenarios-file).
DEFAULT_SCENARIOS_FILE = Path(__file__).resolve().parents[2] / "config" / "scenarios.yaml"
# Request inputs every stage may read. Some are only *required* if a stage cannot do without them.
REQUEST_KEYS = frozenset({"user_id", "history", "context.item_ids", "context.category"})
# The request fields a scenario can make mandatory (history is always present, possibly empty).
REQUIRABLE_FIELDS = frozenset({"user_id", "context.item_ids", "context.category"})
# Where each key a stage may need comes from, for the error message.
PRODUCERS = {
    "candidates": "a recall stage",
    "attributes": "a recall stage",
    "rank_scores": "a rank stage",
    "bids": "a recall stage with filters.sponsored_only: true",
}


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
    experiment: Experiment | None = None  # on the scenario as configured; its arms are variants
    experiment_name: str = ""  # on an arm's variant: the experiment and arm it serves
    arm: str = ""

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

    @property
    def takes_context_items(self) -> bool:
        """Whether requests carry context items (the viewed item, the cart): its recall is
        seeded by them or excludes them."""
        recall = self.recall
        return "context.item_ids" in recall.seeds or recall.exclude_context

    def variant_for(self, key: str) -> Scenario:
        """The scenario ``key`` (a user id, else a request id) is served: its experiment arm's
        variant, or this scenario when it runs no experiment."""
        if self.experiment is None:
            return self
        return self.experiment.assign(key).scenario

    def replace_stage(self, kind: str, stage: Stage | None) -> Scenario:
        """This scenario with its ``kind`` stage replaced (or removed when ``stage`` is None),
        checked again: e.g. an ablation without one rule, or without the ranker."""
        return self.with_stages(
            tuple(s if s.kind != kind else stage for s in self.stages if s.kind != kind or stage is not None)
        )

    def with_stages(self, stages: tuple[Stage, ...]) -> Scenario:
        """This scenario with other stages (checked), outside any experiment."""
        required = set(check_pipeline(self.name, stages)) | ({"user_id"} if self.personalised else set())
        return dataclasses.replace(
            self,
            stages=stages,
            required_fields=frozenset(required),
            experiment=None,
            experiment_name="",
            arm="",
        )


@dataclass(frozen=True)
class ScenarioSet:
    """All scenarios of one config file, plus a short digest that identifies the file's content."""

    scenarios: Mapping[str, Scenario]
    digest: str
    popular_cache_size: int = 1000
    popular_refresh_s: float = 60.0

    def get(self, name: str) -> Scenario | None:
        return self.scenarios.get(name)


def _parse_stage(spec: Any, scenario: str, index: int) -> Stage:
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ScenarioConfigError(
            f"{where(scenario)}: stages[{index}] must be a one-key mapping (recall:, rank: or rerank:)"
        )
    ((kind, body),) = spec.items()
    stage = STAGES.get(kind)
    if stage is None:
        raise ScenarioConfigError(
            f"{where(scenario)}: stages[{index}]: unknown stage {kind!r} ({', '.join(STAGES)})"
        )
    return stage.parse(body, where(scenario, kind))


def check_pipeline(name: str, stages: tuple[Stage, ...]) -> frozenset[str]:
    """Check that each stage kind appears once and each stage's needs are met by the request or
    an earlier stage (stages run in the declared order: a rule may run before rank, e.g. to drop
    items rank need not score).

    Returns the request fields the scenario requires. Raises :class:`ScenarioConfigError`
    naming the scenario and the first stage that does not fit.
    """
    if not stages:
        raise ScenarioConfigError(f"{where(name)}: no stages")
    available: set[str] = set(REQUEST_KEYS)
    required_fields: set[str] = set()
    seen_kinds: set[str] = set()
    for stage in stages:
        at = where(name, stage.kind)
        if stage.kind in seen_kinds:
            raise ScenarioConfigError(f"{at}: appears twice; a pipeline has at most one stage of each kind")
        seen_kinds.add(stage.kind)
        required, _optional = stage.needs()
        missing = sorted(required - available)
        if missing:
            hints = "; ".join(f"{key} comes from {PRODUCERS.get(key, 'the request')}" for key in missing)
            raise ScenarioConfigError(f"{at}: needs {missing}, which no earlier stage produces ({hints})")
        required_fields |= required & REQUIRABLE_FIELDS
        available |= stage.produces()
    if "candidates" not in available:
        raise ScenarioConfigError(f"{where(name)}: no recall stage produces candidates")
    return frozenset(required_fields)


def _parse_stages(spec: Any, name: str, at: str) -> tuple[Stage, ...]:
    if not isinstance(spec, list):
        raise ScenarioConfigError(f"{at}: stages must be a list")
    return tuple(_parse_stage(stage, name, i) for i, stage in enumerate(spec))


def _parse_experiment(spec: Any, scenario: Scenario) -> Experiment:
    """The scenario's experiment; each arm a variant of ``scenario`` (checked like a scenario)."""
    at = f"{where(scenario.name)}, experiment"
    spec = fields(spec, at, {"name", "salt", "arms"})
    name = spec.get("name")
    if not isinstance(name, str) or not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ScenarioConfigError(f"{at}: name is required (letters, digits, _ and -)")
    salt = spec.get("salt", "")
    if not isinstance(salt, str | int):
        raise ScenarioConfigError(f"{at}: salt must be a string")
    arms_spec = spec.get("arms")
    if not isinstance(arms_spec, Mapping) or len(arms_spec) < 2:
        raise ScenarioConfigError(f"{at}: arms must map at least two arm names to {{share, stages}}")
    arms = []
    for arm_name, arm_spec in arms_spec.items():
        arm_at = f"{at}, arm {arm_name!r}"
        if not isinstance(arm_name, str) or not arm_name.replace("_", "").replace("-", "").isalnum():
            raise ScenarioConfigError(f"{arm_at}: bad arm name (letters, digits, _ and -)")
        arm_spec = fields(arm_spec, arm_at, {"share", "stages"})
        share = number(arm_spec.get("share"), arm_at, "share", 0, 100)
        if share <= 0:
            raise ScenarioConfigError(f"{arm_at}: share must be > 0")
        stages = scenario.stages
        if "stages" in arm_spec:
            stages = _parse_stages(arm_spec["stages"], scenario.name, f"{arm_at}, stages")
            try:
                check_pipeline(scenario.name, stages)
            except ScenarioConfigError as error:
                raise ScenarioConfigError(f"{arm_at}: {error}") from None
        arms.append(Arm(name=arm_name, share=share, scenario=scenario.with_stages(stages)))
    return Experiment(name=name, salt=str(salt), arms=tuple(arms))


def _parse_scenario(name: str, spec: Any, defaults: Mapping[str, Any]) -> Scenario:
    at = where(name)
    spec = fields(
        spec, at, {"stages", "personalised", "model_scenario", "timeout_ms", "num_items", "experiment"}
    )
    stages = _parse_stages(spec.get("stages"), name, at)
    required = set(check_pipeline(name, stages))
    personalised = boolean(spec.get("personalised", defaults.get("personalised", True)), at, "personalised")
    if personalised:
        required.add("user_id")
    model_scenario = spec.get("model_scenario", "")
    if not isinstance(model_scenario, str):
        raise ScenarioConfigError(f"{at}: model_scenario must be a string")
    scenario = Scenario(
        name=name,
        stages=stages,
        personalised=personalised,
        model_scenario=model_scenario,
        timeout_ms=number(
            spec.get("timeout_ms", defaults.get("timeout_ms", 300)), at, "timeout_ms", 1, 600_000
        ),
        default_num_items=integer(
            spec.get("num_items", defaults.get("num_items", 20)), at, "num_items", 1, MAX_NUM_ITEMS
        ),
        required_fields=frozenset(required),
    )
    if "experiment" not in spec:
        return scenario
    experiment = _parse_experiment(spec["experiment"], scenario)
    # The scenario requires what any of its arms requires (the request is validated before the
    # arm is known); each arm's variant names its experiment and arm.
    required = frozenset(set().union(*(arm.scenario.required_fields for arm in experiment.arms)))
    arms = tuple(
        dataclasses.replace(
            arm,
            scenario=dataclasses.replace(
                arm.scenario, required_fields=required, experiment_name=experiment.name, arm=arm.name
            ),
        )
        for arm in experiment.arms
    )
    return dataclasses.replace(
        scenario, required_fields=required, experiment=dataclasses.replace(experiment, arms=arms)
    )


def parse_scenarios(document: Any, digest: str = "") -> ScenarioSet:
    """Build a :class:`ScenarioSet` from a parsed YAML document, validating everything."""
    top = fields(document, "scenario config", {"version", "defaults", "popular_cache", "scenarios"})
    if top.get("version", 1) != 1:
        raise ScenarioConfigError(f"scenario config: unsupported version {top.get('version')!r} (expected 1)")
    defaults = fields(top.get("defaults"), "defaults", {"personalised", "timeout_ms", "num_items"})
    popular = fields(top.get("popular_cache"), "popular_cache", {"size", "refresh_s"})
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
        popular_cache_size=integer(popular.get("size", 1000), "popular_cache", "size", 1, 10_000),
        popular_refresh_s=number(popular.get("refresh_s", 60), "popular_cache", "refresh_s", 0.1, 86_400),
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
