"""Routing rules: the typed model of ``conf/rules.yaml``, its loader and the router.

Rules are data, never code. They are tried in order; the first whose ``when`` holds for at
least one series of the study decides (see :mod:`.conditions` for what a condition can test).
A rule's ``when`` is evaluated on each series in turn, so ``all: [Modality is CT,
BodyPartExamined is HEAD]`` must hold for one and the same series; the series for which it
holds are the candidates the detectors' series selection chooses from. ``fallback`` decides
for studies no rule matches (without it they are recorded as "no rule matched").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from triage_node.errors import RoutingError
from triage_node.routing.conditions import (
    Condition,
    SeriesView,
    StudyContext,
    Trace,
    TraceLine,
    uses_instance_level,
)


class Priority(StrEnum):
    """Processing priority: the job queue runs ``stat`` before ``urgent`` before ``routine``."""

    STAT = "stat"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        return list(Priority).index(self)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Action(_Strict):
    detectors: list[str] = Field(default_factory=list)
    priority: Priority = Priority.ROUTINE
    destinations: list[str] | None = None
    """Where results go; default: the node's ``default_destinations``."""
    ignore: bool = False
    """Match and do nothing (recorded as not-applicable with the rule's name)."""

    @model_validator(mode="after")
    def _has_action(self) -> _Action:
        if self.ignore and self.detectors:
            raise ValueError("a rule cannot both ignore and run detectors")
        if not self.ignore and not self.detectors:
            raise ValueError("a rule needs detectors to run, or ignore: true")
        return self


class RoutingRule(_Action):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)
    description: str = ""
    when: Condition


class FallbackRule(_Action):
    """What to do with studies no rule matches."""


class RuleSet(_Strict):
    rules: list[RoutingRule]
    fallback: FallbackRule | None = None

    @model_validator(mode="after")
    def _unique_names(self) -> RuleSet:
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            seen.add(rule.name)
        return self

    @property
    def needs_instances(self) -> bool:
        return any(uses_instance_level(r.when) for r in self.rules)


FALLBACK = "fallback"


@dataclass(frozen=True)
class Decision:
    """The routing outcome for one study."""

    rule: str | None
    detectors: list[str] = field(default_factory=list)
    priority: Priority = Priority.ROUTINE
    destinations: list[str] | None = None
    matched_series: list[SeriesView] = field(default_factory=list)
    ignored: bool = False

    @property
    def matched(self) -> bool:
        return self.rule is not None


@dataclass
class RuleExplanation:
    rule: str
    matched: bool
    matched_series: list[str]
    """Keys of the series for which the rule's ``when`` holds."""
    traces: dict[str, list[TraceLine]]
    """Per series key, every condition evaluated with its outcome and the value seen."""


class Router:
    """Evaluates a :class:`RuleSet` against a study."""

    def __init__(self, ruleset: RuleSet, known_detectors: set[str] | None = None,
                 known_destinations: set[str] | None = None) -> None:
        actions: list[tuple[str, _Action]] = [(r.name, r) for r in ruleset.rules]
        if ruleset.fallback is not None:
            actions.append((FALLBACK, ruleset.fallback))
        for name, action in actions:
            if known_detectors is not None:
                unknown = [d for d in action.detectors if d not in known_detectors]
                if unknown:
                    raise RoutingError(
                        f"rule {name!r}: unknown detector(s) {', '.join(unknown)}; "
                        f"configured: {', '.join(sorted(known_detectors)) or 'none'}")
            if known_destinations is not None and action.destinations is not None:
                unknown = [d for d in action.destinations if d not in known_destinations]
                if unknown:
                    raise RoutingError(
                        f"rule {name!r}: unknown destination(s) {', '.join(unknown)}; "
                        f"configured: {', '.join(sorted(known_destinations)) or 'none'}")
        self.ruleset = ruleset

    @property
    def needs_instances(self) -> bool:
        return self.ruleset.needs_instances

    def decide(self, ctx: StudyContext) -> Decision:
        for rule in self.ruleset.rules:
            matching = [s for s in ctx.series if rule.when.evaluate(ctx, s)]
            if matching:
                return self._decision(rule.name, rule, matching)
        if self.ruleset.fallback is not None:
            return self._decision(FALLBACK, self.ruleset.fallback, list(ctx.series))
        return Decision(rule=None)

    @staticmethod
    def _decision(name: str, action: _Action, series: list[SeriesView]) -> Decision:
        return Decision(rule=name, detectors=list(action.detectors), priority=action.priority,
                        destinations=action.destinations, matched_series=series,
                        ignored=action.ignore)

    def explain(self, ctx: StudyContext) -> tuple[list[RuleExplanation], Decision]:
        """Evaluate every rule on every series (no short-cut) and return the traces."""
        explanations = []
        for rule in self.ruleset.rules:
            traces: dict[str, list[TraceLine]] = {}
            matching = []
            for s in ctx.series:
                trace = Trace()
                if rule.when.evaluate(ctx, s, trace):
                    matching.append(s.series_key)
                traces[s.series_key] = trace.lines
            explanations.append(RuleExplanation(rule.name, bool(matching), matching, traces))
        return explanations, self.decide(ctx)


# --- loading, with errors that name the file, the line and the rule -------------------------

_CONDITION_TAGS = frozenset({"attribute", "source", "all", "any", "not"})


def _strip_tags(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop the union tags pydantic puts in error locations after each condition slot."""
    out: list[Any] = []
    expect_tag = False
    for part in loc:
        if expect_tag and part in _CONDITION_TAGS:
            expect_tag = False
            continue
        expect_tag = part in ("when", "not") or (
            isinstance(part, int) and bool(out) and out[-1] in ("all", "any"))
        out.append(part)
    return tuple(out)


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The line of the YAML node a (tag-free) error location points at (1-based)."""
    if root is None:
        return None
    node: yaml.Node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = [value for key, value in node.value if key.value == part]
            if not found:
                break
            node = found[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            node = node.value[part]
        else:
            break
    return int(node.start_mark.line) + 1


def _format_errors(path: Path, raw: Any, root: yaml.Node | None,
                   exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        loc = _strip_tags(tuple(err["loc"]))
        line = _line_of(root, loc)
        where = f"{path}:{line}" if line else str(path)
        rule = ""
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            try:
                rule = f" rule {raw['rules'][loc[1]].get('name', '#' + str(loc[1] + 1))!r}:"
            except (KeyError, IndexError, TypeError, AttributeError):
                rule = f" rule #{loc[1] + 1}:"
            loc = loc[2:]
        key = ".".join(str(p) for p in loc)
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        msg = msg.removeprefix("Value error, ")
        lines.append(f"{where}:{rule} {key}: {msg}" if key else f"{where}:{rule} {msg}")
    return "\n".join(lines)


def parse_rules(text: str, path: Path) -> RuleSet:
    """Validate rules given as YAML text (``path`` is only used in messages)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise RoutingError(f"{where}: not valid YAML: {getattr(exc, 'problem', exc)}") from exc
    if not isinstance(raw, dict) or "rules" not in raw:
        raise RoutingError(f"{path}:1: expected a mapping with a 'rules' list")
    try:
        return RuleSet.model_validate(raw)
    except ValidationError as exc:
        raise RoutingError(_format_errors(path, raw, root, exc)) from exc


def load_rules(path: Path) -> RuleSet:
    """Load and validate a rules file; errors name the file, line, rule and expectation."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RoutingError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    return parse_rules(text, path)
