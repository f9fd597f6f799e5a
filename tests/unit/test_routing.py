"""Routing rules evaluated on attributes indexed from real DICOM headers (pydicom's files)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from triage_node.errors import RoutingError
from triage_node.routing.conditions import Range, SeriesView, StudyContext
from triage_node.routing.rules import Priority, Router, RuleSet, load_rules, parse_rules
from triage_node.routing.selection import CountRange, SeriesSelection, select_series, why_none
from triage_node.spool.index import read_header

REPO = Path(__file__).resolve().parents[2]


def _attrs(filename: str, **overrides: str | None) -> dict[str, object]:
    path = get_testdata_file(filename, download=False)
    assert isinstance(path, str)
    attrs: dict[str, object] = dict(read_header(Path(path).read_bytes()).attributes)
    for k, v in overrides.items():
        if v is None:
            attrs.pop(k, None)
        else:
            attrs[k] = v
    return attrs


def _series(filename: str, key: str = "r-1", count: int = 10,
            **overrides: str | None) -> SeriesView:
    return SeriesView(series_uid="1.2." + key, series_key=key, instance_count=count,
                      attributes=_attrs(filename, **overrides))


def _ctx(*series: SeriesView, calling: str = "PACS", host: str = "10.0.0.5") -> StudyContext:
    return StudyContext(study_attributes=dict(series[0].attributes), series=list(series),
                        calling_ae=calling, called_ae="TRIAGE", host=host)


def _router() -> Router:
    known = {p.stem for p in (REPO / "conf" / "detectors").glob("*.yaml")}
    return Router(load_rules(REPO / "conf" / "rules.yaml"), known_detectors=known)


def _one_rule(condition: dict[str, object]) -> Router:
    return Router(RuleSet.model_validate({"rules": [{"name": "r", "detectors": ["d"],
                                                     "when": condition}]}))


def test_head_ct_by_body_part() -> None:
    decision = _router().decide(_ctx(_series("CT_small.dcm", BodyPartExamined="HEAD",
                                             StudyDescription=None)))
    assert decision.rule == "head-ct-hemorrhage"
    assert decision.detectors == ["ct-head-hemorrhage"]
    assert decision.priority is Priority.ROUTINE


def test_head_ct_by_study_description() -> None:
    ctx = _ctx(_series("CT_small.dcm", BodyPartExamined=None, StudyDescription="CT Brain w/o"))
    assert _router().decide(ctx).matched


def test_chest_ct_goes_to_nodules_and_mr_head_to_the_tumour_detector() -> None:
    chest = _series("CT_small.dcm", BodyPartExamined="CHEST", StudyDescription="CT THORAX")
    decision = _router().decide(_ctx(chest))
    assert (decision.rule, decision.detectors) == ("chest-ct-nodule", ["ct-chest-nodule"])
    by_description = _series("CT_small.dcm", BodyPartExamined="", StudyDescription="CT LUNG")
    assert _router().decide(_ctx(by_description)).rule == "chest-ct-nodule"
    abdomen = _series("CT_small.dcm", BodyPartExamined="ABDOMEN", StudyDescription="CT ABD")
    assert not _router().decide(_ctx(abdomen)).matched
    decision = _router().decide(_ctx(_series("MR_small.dcm", BodyPartExamined="HEAD")))
    assert decision.rule == "mr-brain-tumor"
    assert decision.detectors == ["mr-brain-tumor"]
    mr_knee = _series("MR_small.dcm", BodyPartExamined="KNEE", StudyDescription="MR KNEE")
    assert not _router().decide(_ctx(mr_knee)).matched


def test_conditions_must_hold_on_the_same_series() -> None:
    router = _one_rule({"all": [{"attribute": "Modality", "equals": "CT"},
                                {"attribute": "BodyPartExamined", "equals": "HEAD"}]})
    ct_chest = _series("CT_small.dcm", "r-a", BodyPartExamined="CHEST")
    mr_head = _series("MR_small.dcm", "r-b", BodyPartExamined="HEAD")
    assert not router.decide(_ctx(ct_chest, mr_head)).matched
    ct_head = _series("CT_small.dcm", "r-c", BodyPartExamined="HEAD")
    decision = router.decide(_ctx(ct_chest, mr_head, ct_head))
    assert [s.series_key for s in decision.matched_series] == ["r-c"]


@pytest.mark.parametrize(("condition", "expected"), [
    ({"attribute": "Modality", "equals": "CT"}, True),
    ({"attribute": "Modality", "equals": "MR"}, False),
    ({"attribute": "Modality", "one_of": ["MR", "CT"]}, True),
    ({"attribute": "Modality", "one_of": ["MR", "PT"]}, False),
    ({"attribute": "Manufacturer", "regex": "(?i)^ge"}, True),
    ({"attribute": "Manufacturer", "regex": "^Siemens"}, False),
    ({"attribute": "ImageType", "contains": "axial"}, True),
    ({"attribute": "ImageType", "contains": "LOCALIZER"}, False),
    ({"attribute": "SliceThickness", "range": {"min": 4.5, "max": 5.5}}, True),
    ({"attribute": "SliceThickness", "range": {"max": 1.0}}, False),
    ({"attribute": "KVP", "range": {"min": 100}}, True),
    ({"attribute": "BodyPartExamined", "exists": False}, True),
    ({"attribute": "BodyPartExamined", "missing": True}, True),
    ({"attribute": "Modality", "exists": True}, True),
    ({"attribute": "(0008,0060)", "equals": "CT"}, True),
    ({"attribute": "(0018,0015)", "exists": True}, False),
    ({"not": {"attribute": "Modality", "equals": "CT"}}, False),
    ({"all": [{"attribute": "Modality", "equals": "CT"},
              {"attribute": "Manufacturer", "contains": "ge"}]}, True),
    ({"any": [{"attribute": "Modality", "equals": "MR"},
              {"attribute": "Manufacturer", "regex": "^GE"}]}, True),
    ({"attribute": "Modality", "level": "study", "equals": "OT"}, True),
    ({"attribute": "InstanceNumber", "level": "instance", "equals": "7"}, True),
    ({"attribute": "InstanceNumber", "level": "instance", "equals": "99"}, False),
    ({"source": "calling_ae", "equals": "ED_CT"}, True),
    ({"source": "calling_ae", "equals": "PACS"}, False),
    ({"source": "host", "regex": r"^10\.1\."}, True),
    ({"source": "called_ae", "one_of": ["TRIAGE"]}, True),
])
def test_each_operator(condition: dict[str, object], expected: bool) -> None:
    base = _attrs("CT_small.dcm", BodyPartExamined=None)
    instances = tuple({**base, "InstanceNumber": str(n)} for n in range(1, 11))
    series = SeriesView("1.2", "r-1", 10, base, instances)
    ctx = StudyContext(study_attributes={"Modality": "OT"}, series=[series],
                       calling_ae="ED_CT", called_ae="TRIAGE", host="10.1.2.3")
    router = _one_rule(condition)
    assert router.decide(ctx).matched is expected
    explanations, _ = router.explain(ctx)
    assert explanations[0].matched is expected
    assert explanations[0].traces["r-1"][0].matched is expected


def test_fallback_and_ignore_and_first_match_wins() -> None:
    rules = RuleSet.model_validate({
        "rules": [
            {"name": "test-modality", "ignore": True,
             "when": {"source": "calling_ae", "equals": "QA_PHANTOM"}},
            {"name": "ct", "detectors": ["d"], "priority": "stat",
             "when": {"attribute": "Modality", "equals": "CT"}},
            {"name": "ct-again", "detectors": ["e"],
             "when": {"attribute": "Modality", "equals": "CT"}},
        ],
        "fallback": {"detectors": ["e"], "destinations": ["archive"]},
    })
    router = Router(rules)
    ct = _series("CT_small.dcm")
    assert router.decide(_ctx(ct, calling="QA_PHANTOM")).ignored
    decision = router.decide(_ctx(ct))
    assert (decision.rule, decision.priority, decision.detectors) == ("ct", Priority.STAT, ["d"])
    fallback = router.decide(_ctx(_series("MR_small.dcm")))
    assert (fallback.rule, fallback.detectors, fallback.destinations) == \
        ("fallback", ["e"], ["archive"])


def _error(text: str, tmp_path: Path) -> str:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RoutingError) as err:
        load_rules(path)
    return str(err.value)


def test_errors_name_file_line_rule_and_fix(tmp_path: Path) -> None:
    msg = _error("rules:\n"
                 "  - name: head\n"
                 "    detectors: [d]\n"
                 "    when:\n"
                 "      all:\n"
                 "        - attribute: Modality\n"
                 "          equals: CT\n"
                 "        - attribute: BodyPartExamind\n"
                 "          equals: HEAD\n", tmp_path)
    assert f"{tmp_path / 'rules.yaml'}:8: rule 'head': when.all.1.attribute:" in msg
    assert "did you mean 'BodyPartExamined'?" in msg


@pytest.mark.parametrize(("text", "expected"), [
    ("rules:\n  - name: r\n    detectors: [d]\n    when: {attribute: Modality, regex: '(CT'}\n",
     ":4: rule 'r': when.regex: regex '(CT' does not compile"),
    ("rules:\n  - name: r\n    detectors: [d]\n    when: {attribute: Modality}\n",
     ":4: rule 'r': when: a condition needs exactly one operator"),
    ("rules:\n  - name: r\n    detectors: [d]\n    when: {attribute: Modality, equals: CT,"
     " contains: C}\n", "(got equals, contains)"),
    ("rules:\n  - name: r\n    when: {attribute: Modality, equals: CT}\n",
     "rule 'r': a rule needs detectors to run, or ignore: true"),
    ("rules:\n  - name: r\n    detectors: [d]\n    priorty: stat\n"
     "    when: {attribute: Modality, equals: CT}\n", ":4: rule 'r': priorty: unknown key"),
    ("rules:\n  - name: r\n    detectors: [d]\n    priority: asap\n"
     "    when: {attribute: Modality, equals: CT}\n",
     "rule 'r': priority: Input should be 'stat', 'urgent' or 'routine'"),
    ("rules:\n  - name: r\n    detectors: [d]\n"
     "    when: {attribute: SliceThickness, range: {min: 5, max: 1}}\n",
     "range min 5.0 is above max 1.0"),
    ("rules:\n  - name: r\n    detectors: [d]\n    when: 5\n",
     "a condition is a mapping with 'attribute'"),
    ("rules:\n  - {name: r, detectors: [d], when: {attribute: Modality, equals: CT}}\n"
     "  - {name: r, detectors: [d], when: {attribute: Modality, equals: MR}}\n",
     "rule name 'r' is used twice"),
    ("rules: [\n", "not valid YAML"),
    ("hello: 1\n", "expected a mapping with a 'rules' list"),
])
def test_error_messages(text: str, expected: str, tmp_path: Path) -> None:
    assert expected in _error(text, tmp_path)


def test_unknown_detector_and_destination_are_refused() -> None:
    with pytest.raises(RoutingError, match="unknown detector"):
        Router(load_rules(REPO / "conf" / "rules.yaml"), known_detectors={"other"})
    rules = parse_rules("rules:\n  - {name: r, detectors: [d], destinations: [nowhere],"
                        " when: {attribute: Modality, equals: CT}}\n", Path("x.yaml"))
    with pytest.raises(RoutingError, match="unknown destination"):
        Router(rules, known_destinations={"orthanc"})


def _view(key: str, count: int, image_type: list[str], thickness: str = "5",
          iop: list[str] | None = None, modality: str = "CT") -> SeriesView:
    return SeriesView(key, key, count, {
        "Modality": modality, "ImageType": image_type, "SliceThickness": thickness,
        "ImageOrientationPatient": iop or ["1", "0", "0", "0", "1", "0"],
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"})


def test_series_selection() -> None:
    axial = _view("r-a", 120, ["ORIGINAL", "PRIMARY", "AXIAL"], "2.5")
    scout = _view("r-b", 300, ["ORIGINAL", "PRIMARY", "LOCALIZER"])
    thin = _view("r-c", 240, ["ORIGINAL", "PRIMARY", "AXIAL"], "0.625")
    coronal = _view("r-d", 400, ["DERIVED", "SECONDARY", "REFORMATTED"], "2",
                    iop=["1", "0", "0", "0", "0", "-1"])
    sc = SeriesView("r-e", "r-e", 500, {"Modality": "CT",
                                         "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"})
    series = [axial, scout, thin, coronal, sc]
    chosen, _ = select_series(series, SeriesSelection(), ["CT"])
    assert chosen is coronal  # largest that is not a localizer or secondary capture
    axial_only = SeriesSelection(orientation="axial", exclude_derived=True)
    assert select_series(series, axial_only, ["CT"])[0] is thin
    band = SeriesSelection(slice_thickness_mm=Range(min=1.0, max=3.0), orientation="axial")
    assert select_series(series, band, ["CT"])[0] is axial
    assert select_series(series, SeriesSelection(prefer="thinnest"), ["CT"])[0] is thin
    few = SeriesSelection(instances=CountRange(min=1000))
    none, verdicts = select_series(series, few, ["CT"])
    assert none is None
    why = why_none(verdicts)
    assert "r-a 120 instances, need 1000-any" in why
    assert "r-b image type LOCALIZER" in why and "r-e secondary capture" in why
    assert "modality CT not in MR" in why_none(select_series([axial], SeriesSelection(),
                                                              ["MR"])[1])
