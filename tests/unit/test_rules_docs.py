"""Every YAML example in docs/rules.md is valid rule syntax (so the reference cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from triage_node.routing.rules import RuleSet
from triage_node.routing.selection import SeriesSelection

DOC = Path(__file__).resolve().parents[2] / "docs" / "rules.md"
BLOCKS = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_reference_has_an_example_per_operator() -> None:
    text = "\n".join(BLOCKS)
    for op in ("equals:", "one_of:", "regex:", "contains:", "range:", "exists:", "missing:",
               "all:", "any:", "not:", "level: study", "level: instance", "source:"):
        assert op in text, op
    assert len(re.findall(r"^### \d\. ", DOC.read_text(), flags=re.M)) == 5


@pytest.mark.parametrize("block", BLOCKS)
def test_example_is_valid(block: str) -> None:
    data = yaml.safe_load(block)
    if "rules" in data:
        RuleSet.model_validate(data)
    elif "when" in data:
        RuleSet.model_validate({"rules": [{"name": "x", "detectors": ["d"], **data}]})
    else:
        assert "series" in data  # the detector series-selection example
        SeriesSelection.model_validate(data["series"])
