"""Conditions of routing rules: typed models, evaluation and an explanation trace.

A condition tests one thing about a study:

* ``attribute`` — a DICOM attribute by keyword (``BodyPartExamined``) or tag (``(0018,0015)``),
  at ``level`` ``series`` (default: the series being considered), ``study`` (the study's
  attributes) or ``instance`` (true when any instance of the series passes);
* ``source`` — how the study arrived: ``calling_ae``, ``called_ae`` or ``host``;

with exactly one operator: ``equals``, ``one_of``, ``regex``, ``contains`` (case-insensitive),
``range`` (numeric, inclusive ``min``/``max``), ``exists: true|false`` or ``missing: true``.
Conditions combine with ``all``, ``any`` and ``not``. Multi-valued attributes pass when any
value passes (``contains`` and ``regex`` also see the values joined with a backslash).
Nothing here executes code from the file: regexes are compiled and bounded by Python's ``re``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydicom.datadict import keyword_dict, keyword_for_tag

_TAG = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")
Attributes = dict[str, Any]
_OPERATORS = ("equals", "one_of", "regex", "contains", "range", "exists", "missing")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def check_attribute_name(name: str) -> str:
    """Accept a DICOM keyword or ``(gggg,eeee)``; suggest the nearest keyword otherwise."""
    match = _TAG.match(name)
    if match:
        # A public tag is indexed under its keyword; private tags keep the (gggg,eeee) form.
        keyword = keyword_for_tag(int(match.group(1) + match.group(2), 16))
        return keyword or name.upper()
    if name in keyword_dict:
        return name
    near = difflib.get_close_matches(name, list(keyword_dict), n=1, cutoff=0.75)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ValueError(f"{name!r} is not a DICOM keyword or (gggg,eeee) tag{hint}")


@dataclass(frozen=True)
class SeriesView:
    """What routing sees of a series: its opaque key, instance count and indexed attributes.

    ``instances`` holds, per instance, the attributes whose value differs from the series'
    ``attributes`` (only loaded when a rule has an
    instance-level condition).
    """

    series_uid: str
    series_key: str
    instance_count: int
    attributes: Attributes
    instances: tuple[Attributes, ...] = ()


@dataclass(frozen=True)
class StudyContext:
    """Everything a rule may look at for one study."""

    study_attributes: Attributes
    series: list[SeriesView]
    calling_ae: str = ""
    called_ae: str = ""
    host: str = ""


@dataclass
class TraceLine:
    """One evaluated condition, for ``rules explain``."""

    depth: int
    text: str
    matched: bool
    seen: str = ""


@dataclass
class Trace:
    lines: list[TraceLine] = field(default_factory=list)

    def add(self, depth: int, text: str, matched: bool, seen: str = "") -> None:
        self.lines.append(TraceLine(depth, text, matched, seen))


class Range(_Strict):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounded(self) -> Range:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min {self.min} is above max {self.max}")
        return self

    def __str__(self) -> str:
        lo = "-inf" if self.min is None else f"{self.min:g}"
        hi = "+inf" if self.max is None else f"{self.max:g}"
        return f"[{lo}, {hi}]"


class _Test(_Strict):
    """The operator part shared by attribute and source conditions."""

    equals: str | None = None
    one_of: list[str] | None = None
    regex: str | None = None
    contains: str | None = None
    range: Range | None = None
    exists: bool | None = None
    missing: Literal[True] | None = None

    @field_validator("equals", "contains", mode="before")
    @classmethod
    def _as_text(cls, value: Any) -> Any:
        # YAML reads `equals: 5` as an int; DICOM values are compared as text.
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) \
            else value

    @field_validator("one_of", mode="before")
    @classmethod
    def _as_texts(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
                    for v in value]
        return value

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex {value!r} does not compile: {exc}") from exc
        return value

    @model_validator(mode="after")
    def _one_operator(self) -> _Test:
        given = [op for op in _OPERATORS if getattr(self, op) is not None]
        if len(given) != 1:
            raise ValueError(
                f"a condition needs exactly one operator of {', '.join(_OPERATORS)} "
                f"(got {', '.join(given) or 'none'})")
        return self

    def describe_operator(self) -> str:
        if self.equals is not None:
            return f"equals {self.equals!r}"
        if self.one_of is not None:
            return f"one of {self.one_of}"
        if self.regex is not None:
            return f"matches /{self.regex}/"
        if self.contains is not None:
            return f"contains {self.contains!r}"
        if self.range is not None:
            return f"in {self.range}"
        if self.missing:
            return "is missing"
        return "exists" if self.exists else "is missing"

    def test(self, values: list[str]) -> bool:
        if self.exists is not None:
            return bool(values) == self.exists
        if self.missing:
            return not values
        if not values:
            return False
        if self.equals is not None:
            return any(v.strip() == self.equals for v in values)
        if self.one_of is not None:
            return any(v.strip() in self.one_of for v in values)
        joined = "\\".join(values)
        if self.contains is not None:
            return self.contains.casefold() in joined.casefold()
        if self.range is not None:
            return any(self._in_range(v) for v in values)
        assert self.regex is not None
        return any(re.search(self.regex, v) for v in [*values, joined] if v)

    def _in_range(self, text: str) -> bool:
        try:
            number = float(text)
        except ValueError:
            return False
        assert self.range is not None
        lo, hi = self.range.min, self.range.max
        return (lo is None or number >= lo) and (hi is None or number <= hi)


def _as_values(raw: Any) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, list):
        return [str(v) for v in raw if str(v) != ""]
    return [str(raw)] if str(raw) != "" else []


def _shown(values: list[str]) -> str:
    if not values:
        return "(absent)"
    text = "\\".join(values)
    return text if len(text) <= 60 else text[:57] + "..."


class AttributeCondition(_Test):
    attribute: str
    level: Literal["series", "study", "instance"] = "series"

    _attr = field_validator("attribute")(check_attribute_name)

    def evaluate(self, ctx: StudyContext, series: SeriesView, trace: Trace | None = None,
                 depth: int = 0) -> bool:
        if self.level == "instance":
            seen: list[str] = []
            matched = False
            for delta in series.instances or ({},):
                # An instance's value is its own where it differs, else the series' value.
                raw = delta.get(self.attribute, series.attributes.get(self.attribute))
                values = _as_values(raw)
                if not seen and values:
                    seen = values
                if self.test(values):
                    matched, seen = True, values
                    break
        else:
            attrs = ctx.study_attributes if self.level == "study" else series.attributes
            seen = _as_values(attrs.get(self.attribute))
            matched = self.test(seen)
        if trace is not None:
            where = "" if self.level == "series" else f" ({self.level})"
            trace.add(depth, f"{self.attribute}{where} {self.describe_operator()}", matched,
                      _shown(seen))
        return matched


class SourceCondition(_Test):
    source: Literal["calling_ae", "called_ae", "host"]

    def evaluate(self, ctx: StudyContext, series: SeriesView, trace: Trace | None = None,
                 depth: int = 0) -> bool:
        value = {"calling_ae": ctx.calling_ae, "called_ae": ctx.called_ae,
                 "host": ctx.host}[self.source]
        values = [value] if value else []
        matched = self.test(values)
        if trace is not None:
            trace.add(depth, f"{self.source} {self.describe_operator()}", matched,
                      _shown(values))
        return matched


def _group(members: list[Any], combine: Callable[[Iterable[bool]], bool], label: str,
           ctx: StudyContext, series: SeriesView, trace: Trace | None, depth: int) -> bool:
    """Evaluate ``all``/``any``: short-circuit when not tracing, every member when explaining."""
    if trace is None:
        return combine(c.evaluate(ctx, series) for c in members)
    at = len(trace.lines)
    result = combine([c.evaluate(ctx, series, trace, depth + 1) for c in members])
    trace.lines.insert(at, TraceLine(depth, label, result))
    return result


class AllCondition(_Strict):
    all: list[Condition] = Field(min_length=1)

    def evaluate(self, ctx: StudyContext, series: SeriesView, trace: Trace | None = None,
                 depth: int = 0) -> bool:
        return _group(self.all, all, "all of:", ctx, series, trace, depth)


class AnyCondition(_Strict):
    any: list[Condition] = Field(min_length=1)

    def evaluate(self, ctx: StudyContext, series: SeriesView, trace: Trace | None = None,
                 depth: int = 0) -> bool:
        return _group(self.any, any, "any of:", ctx, series, trace, depth)


class NotCondition(_Strict):
    not_: Condition = Field(alias="not")

    def evaluate(self, ctx: StudyContext, series: SeriesView, trace: Trace | None = None,
                 depth: int = 0) -> bool:
        if trace is None:
            return not self.not_.evaluate(ctx, series)
        at = len(trace.lines)
        result = not self.not_.evaluate(ctx, series, trace, depth + 1)
        trace.lines.insert(at, TraceLine(depth, "not:", result))
        return result


def _condition_kind(value: Any) -> str | None:
    """Pick the condition model by its key, so errors speak of one model, not of all five."""
    if isinstance(value, BaseModel):
        return {AllCondition: "all", AnyCondition: "any", NotCondition: "not",
                SourceCondition: "source"}.get(type(value), "attribute")
    if isinstance(value, dict):
        for key in ("all", "any", "not", "source"):
            if key in value:
                return key
        return "attribute"
    return None


Condition = Annotated[
    Annotated[AttributeCondition, Tag("attribute")]
    | Annotated[SourceCondition, Tag("source")]
    | Annotated[AllCondition, Tag("all")]
    | Annotated[AnyCondition, Tag("any")]
    | Annotated[NotCondition, Tag("not")],
    Discriminator(
        _condition_kind,
        custom_error_type="condition",
        custom_error_message="a condition is a mapping with 'attribute', 'source', 'all', "
                             "'any' or 'not'",
    ),
]
AllCondition.model_rebuild()
AnyCondition.model_rebuild()
NotCondition.model_rebuild()


def uses_instance_level(condition: Any) -> bool:
    """Whether a condition tree needs per-instance attributes."""
    if isinstance(condition, AttributeCondition):
        return condition.level == "instance"
    if isinstance(condition, AllCondition):
        return any(uses_instance_level(c) for c in condition.all)
    if isinstance(condition, AnyCondition):
        return any(uses_instance_level(c) for c in condition.any)
    if isinstance(condition, NotCondition):
        return uses_instance_level(condition.not_)
    return False
