"""Per-image analysis (``analyse: each_image``): a 4-view mammography study through the node's
processor with the committed mg-mass engine, as one series and as four; result UIDs per image.
"""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from tests.unit.test_retention import SOURCE, make_node
from trainers.phantoms.mammo import generate_mammogram, write_mammogram
from triage_node.detectors.findings import Urgency
from triage_node.imaging.loader import load_series
from triage_node.node import Node
from triage_node.pipeline.processor import StudyOutcome
from triage_node.results.identity import ResultIdentity, ResultKind
from triage_node.routing.conditions import SeriesView, StudyContext
from triage_node.routing.rules import Priority, Router, load_rules

ROOT = Path(__file__).resolve().parents[2]
VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))
RULES = """rules:
  - name: mammography-mass
    description: mammography → mass detector, every view
    when: {attribute: Modality, equals: MG}
    detectors: [mg-mass]
    priority: routine
"""
#: Seeds outside every training, validation and evaluation stream (those use split codes).
SEED = 9091


def _node(tmp_path: Path) -> Node:
    detectors = tmp_path / "detectors"
    detectors.mkdir(parents=True)
    config = (ROOT / "conf" / "detectors" / "mg-mass.yaml").read_text()
    manifest = ROOT / "fixtures" / "engines" / "mg-mass" / "manifest.json"
    config = config.replace("../../fixtures/engines/mg-mass/manifest.json", str(manifest))
    config = config.replace("threads: 2", "threads: 1")
    (detectors / "mg-mass.yaml").write_text(config)
    node = make_node(tmp_path)
    (tmp_path / "rules.yaml").write_text(RULES)
    node.rules.reload()
    return node


def _study(tmp_path: Path, *, series_per_view: bool, mass_view: tuple[str, str] | None,
           study_uid: str) -> list[bytes]:
    """Four views of one woman; a 30 mm mass in ``mass_view``, fatty-to-scattered breasts."""
    one_series = generate_uid()
    out = []
    for number, (laterality, view) in enumerate(VIEWS, start=1):
        diameter = 30.0 if (laterality, view) == mass_view else None
        image, _, info = generate_mammogram(
            [SEED, number], shape=(400, 320), view=view, laterality=laterality,
            mass_diameter_mm=diameter, density="b", margin="spiculated" if diameter else None,
        )
        path = write_mammogram(
            image, info["pixel_spacing_mm"], tmp_path / f"{laterality}{view}.dcm",
            laterality=laterality, view=view, patient_name="PHANTOM^MG", patient_id="MG-1",
            accession_number="MGACC1", study_instance_uid=study_uid,
            series_instance_uid=generate_uid() if series_per_view else one_series,
            series_number=number if series_per_view else 1, instance_number=number,
        )
        out.append(path.read_bytes())
    return out


def _process(node: Node, instances: list[bytes],
             study_uid: str) -> tuple[StudyOutcome, list[Dataset]]:
    for data in instances:
        assert node.ingestor.ingest(data, SOURCE).in_spool
    node.assembler.force_complete(study_uid)
    job = node.jobs.lease()
    assert job is not None
    outcome = node.processor.process(job)
    datasets: list[Dataset] = [
        pydicom.dcmread(BytesIO((node.results_root / o.relative_path).read_bytes()))
        for o in outcome.objects
    ]
    return outcome, datasets


@pytest.mark.parametrize("series_per_view", [False, True], ids=["one-series", "four-series"])
def test_every_view_is_analysed_and_the_study_takes_the_most_urgent(
        tmp_path: Path, series_per_view: bool) -> None:
    node = _node(tmp_path)
    try:
        study_uid = generate_uid()
        instances = _study(tmp_path / "in", series_per_view=series_per_view,
                           mass_view=("L", "MLO"), study_uid=study_uid)
        outcome, datasets = _process(node, instances, study_uid)
        assert outcome.status == "processed" and outcome.detectors == ["mg-mass"]
        # One SR and one heatmap per image (KOS only for positive images).
        by_kind: dict[str, list[Dataset]] = {}
        for ds in datasets:
            by_kind.setdefault(str(ds.Modality), []).append(ds)
        assert len(by_kind["SR"]) == 4 and len(by_kind["OT"]) == 4
        sops = [str(ds.SOPInstanceUID) for ds in datasets]
        series = [str(ds.SeriesInstanceUID) for ds in datasets]
        assert len(set(sops)) == len(sops)  # no collision between images of one series
        assert len(set(series)) == len(series)
        # Each heatmap is about its own image, at its own size.
        sources = {str(pydicom.dcmread(BytesIO(d)).SOPInstanceUID) for d in instances}
        referenced = {str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
                      for ds in by_kind["OT"] if "SourceImageSequence" in ds}
        assert referenced in (sources, set())
        # The study is flagged by its most suspicious image, and the worklist names the
        # image of each finding: compare with the detector run on each file on its own.
        detector = node.detectors["mg-mass"]
        expected: list[tuple[Urgency, str, str]] = []
        for path in sorted((tmp_path / "in").glob("*.dcm")):
            volume = load_series([path])
            ds = volume.source_datasets[0]
            expected.append((detector.run(volume).urgency, ds.ImageLaterality, ds.ViewPosition))
        assert outcome.urgency is min((u for u, _, _ in expected), key=lambda u: u.rank)
        assert sorted(f.label for f in outcome.findings) == sorted(
            f"mass ({lat} {view})" for u, lat, view in expected if u is not Urgency.NEGATIVE)
        assert len(by_kind.get("KO", [])) == len(outcome.findings)  # a KOS per positive image

        # Processing the study again gives the very same objects (no duplicates).
        node.assembler.force_complete(study_uid)
        job = node.jobs.lease()
        assert job is not None
        again = node.processor.process(job)
        assert sorted(o.sop_instance_uid for o in again.objects) == sorted(sops)
    finally:
        node.notifications.close()
        node.db.close()


def test_mammograms_are_routed_to_mg_mass_and_chest_radiographs_are_not() -> None:
    known = {p.stem for p in (ROOT / "conf" / "detectors").glob("*.yaml")}
    router = Router(load_rules(ROOT / "conf" / "rules.yaml"), known_detectors=known)

    def context(**attributes: str) -> StudyContext:
        series = SeriesView(series_uid="1.2.3", series_key="s-1", instance_count=4,
                            attributes=dict(attributes))
        return StudyContext(study_attributes=dict(attributes), series=[series],
                            calling_ae="PACS", called_ae="TRIAGE", host="10.0.0.5")

    decision = router.decide(context(Modality="MG", BodyPartExamined="BREAST"))
    assert (decision.rule, decision.detectors) == ("mammography-mass", ["mg-mass"])
    assert decision.priority is Priority.ROUTINE
    chest = router.decide(context(Modality="DX", BodyPartExamined="CHEST"))
    assert chest.detectors == ["cxr-pneumothorax"]


def test_identity_per_image_differs_per_image_and_keeps_series_uids() -> None:
    base = {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4",
            "detector": "mg-mass", "detector_version": "0.1.0"}
    series_level = ResultIdentity(**base)
    image_a = ResultIdentity(**base, source_instance_uid="1.2.3.4.1")
    image_b = ResultIdentity(**base, source_instance_uid="1.2.3.4.2")
    uids = {identity.sop_instance_uid_for(kind)
            for identity in (series_level, image_a, image_b) for kind in ResultKind}
    assert len(uids) == 3 * len(ResultKind)
    assert image_a.series_instance_uid_for("SR") == ResultIdentity(
        **base, source_instance_uid="1.2.3.4.1").series_instance_uid_for("SR")
    # Without a source instance nothing is added: the series-level UIDs are unchanged.
    assert series_level.sop_instance_uid_for("SR") == ResultIdentity(
        **base, source_instance_uid=None).sop_instance_uid_for("SR")
    with pytest.raises(ValueError, match="source_instance_uid"):
        ResultIdentity(**base, source_instance_uid="not a uid")


def test_for_processing_images_in_the_series_are_not_analysed(tmp_path: Path) -> None:
    node = _node(tmp_path)
    try:
        study_uid = generate_uid()
        instances = _study(tmp_path / "in", series_per_view=False, mass_view=None,
                           study_uid=study_uid)
        raw = pydicom.dcmread(BytesIO(instances[0]))
        raw.SOPClassUID = raw.file_meta.MediaStorageSOPClassUID = UID(
            "1.2.840.10008.5.1.4.1.1.1.2.1")  # the same view, "For Processing"
        raw.SOPInstanceUID = raw.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        raw.PresentationIntentType = "FOR PROCESSING"
        buffer = BytesIO()
        raw.save_as(buffer)
        outcome, datasets = _process(node, [*instances, buffer.getvalue()], study_uid)
        assert outcome.status == "processed"
        srs = [ds for ds in datasets if str(ds.Modality) == "SR"]
        assert len(srs) == 4  # the four presentation views, not the raw one
        analysed = {str(ds.CurrentRequestedProcedureEvidenceSequence[0]
                        .ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
                        .ReferencedSOPInstanceUID) for ds in srs}
        assert str(raw.SOPInstanceUID) not in analysed
    finally:
        node.notifications.close()
        node.db.close()
