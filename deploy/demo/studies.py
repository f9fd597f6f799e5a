"""The demo's sample studies: procedural phantoms written as real DICOM CT series."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom

from trainers.phantoms.chest_ct import generate_chest_ct
from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph
from trainers.phantoms.dicom import write_ct_series
from trainers.phantoms.head_ct import generate_head_ct

# Acquisition grid of the demo's head CTs: 512×512 axial slices, 0.45 mm pixels, 2.5 mm apart.
HEAD_GRID = (60, 512, 512)
HEAD_SPACING = (2.5, 0.45, 0.45)
CHEST_GRID = (48, 512, 512)
CHEST_SPACING = (5.0, 0.7, 0.7)


@dataclass(frozen=True)
class DemoStudy:
    name: str
    folder: Path
    expected_urgency: str
    true_bleed_ml: float | None
    instances: int
    study_instance_uid: str


def make_study(name: str, out_dir: Path, *, seed: int, bleed_ml: float | None,
               kind: str = "head", patient_name: str = "DEMO^PATIENT",
               patient_id: str = "DEMO-0001", accession_number: str = "DEMOACC0001",
               grid: tuple[int, int, int] | None = None,
               spacing: tuple[float, float, float] | None = None,
               bleed_kind: str = "random") -> DemoStudy:
    """Write one phantom study under ``out_dir/name``."""
    folder = out_dir / name
    if kind == "head":
        shape, sp = grid or HEAD_GRID, spacing or HEAD_SPACING
        hu, _, info = generate_head_ct(seed, shape=shape, spacing=sp, bleed_ml=bleed_ml,
                                       bleed_kind=bleed_kind)  # type: ignore[arg-type]
        true_ml = float(info["bleed_ml"]) if bleed_ml else None
        descr, series_descr, body_part = "CT HEAD WO CONTRAST", "Axial 2.5mm brain", "HEAD"
        expected = "critical" if bleed_ml else "negative"
    else:
        shape, sp = grid or CHEST_GRID, spacing or CHEST_SPACING
        hu, info = generate_chest_ct(seed, shape=shape, spacing=sp)
        true_ml = None
        descr, series_descr, body_part = "CT CHEST WO CONTRAST", "Axial 5mm lung", "CHEST"
        expected = "not-applicable"
    paths = write_ct_series(
        hu, sp, folder, patient_name=patient_name, patient_id=patient_id,
        accession_number=accession_number, study_description=descr,
        series_description=series_descr, body_part_examined=body_part,
        origin=(float(info["origin"][0]), float(info["origin"][1]), float(info["origin"][2])))
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    return DemoStudy(name, folder, expected, true_ml, len(paths), study_uid)


def make_radiograph(name: str, out_dir: Path, *, seed: int, pneumothorax_size: float | None,
                    patient_name: str, patient_id: str, accession_number: str) -> DemoStudy:
    """One frontal chest radiograph (DX, 1024×1024), with a pneumothorax when a size is given."""
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    image, _, info = generate_chest_xr(seed, shape=(1024, 1024),
                                       pneumothorax_size=pneumothorax_size)
    path = write_chest_radiograph(image, info["pixel_spacing_mm"], folder / "DX0001.dcm",
                                  modality="DX", patient_name=patient_name,
                                  patient_id=patient_id, accession_number=accession_number)
    study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    return DemoStudy(name, folder, "critical" if pneumothorax_size is not None else "negative",
                     None, 1, study_uid)


def make_demo_studies(out_dir: Path) -> list[DemoStudy]:
    """Three head CTs (a large bleed, a small bleed, a normal), a chest CT no rule takes and a
    chest radiograph with a pneumothorax."""
    return [
        make_study("head-large-bleed", out_dir, seed=101, bleed_ml=25.0,
                   patient_name="DEMO^LARGE", patient_id="DEMO-0101",
                   accession_number="DEMOACC0101"),
        make_study("head-small-bleed", out_dir, seed=102, bleed_ml=6.0,
                   patient_name="DEMO^SMALL", patient_id="DEMO-0102",
                   accession_number="DEMOACC0102"),
        make_study("head-normal", out_dir, seed=103, bleed_ml=None,
                   patient_name="DEMO^NORMAL", patient_id="DEMO-0103",
                   accession_number="DEMOACC0103"),
        make_study("chest", out_dir, seed=104, bleed_ml=None, kind="chest",
                   patient_name="DEMO^CHEST", patient_id="DEMO-0104",
                   accession_number="DEMOACC0104"),
        make_radiograph("chest-xr-pneumothorax", out_dir, seed=105, pneumothorax_size=0.7,
                        patient_name="DEMO^XRAY", patient_id="DEMO-0105",
                        accession_number="DEMOACC0105"),
    ]
