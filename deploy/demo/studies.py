"""The demo's sample studies: procedural phantoms written as real DICOM (CT, MR, DX, MG)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from trainers.phantoms.brain_mr import generate_brain_mr
from trainers.phantoms.chest_ct import NodulePlan, generate_chest_ct
from trainers.phantoms.chest_xr import generate_chest_xr, write_chest_radiograph
from trainers.phantoms.dicom import write_ct_series, write_mr_series
from trainers.phantoms.head_ct import generate_head_ct
from trainers.phantoms.mammo import generate_mammogram, write_mammogram

# Acquisition grid of the demo's head CTs: 512×512 axial slices, 0.45 mm pixels, 2.5 mm apart.
HEAD_GRID = (60, 512, 512)
HEAD_SPACING = (2.5, 0.45, 0.45)
CHEST_GRID = (48, 512, 512)
CHEST_SPACING = (5.0, 0.7, 0.7)
# Brain MR: 2-D axial FLAIR-like, 28 slices of 5 mm, 256×256 at 0.9 mm.
MR_GRID = (28, 256, 256)
MR_SPACING = (5.0, 0.9, 0.9)
# Mammograms: the four views of a screening study, 1024×820 at about 0.2 mm (a reduced
# detector matrix keeps the demo quick; the detector resamples any size).
MG_SHAPE = (1024, 820)
MG_VIEWS = (("R", "CC"), ("L", "CC"), ("R", "MLO"), ("L", "MLO"))


@dataclass(frozen=True)
class DemoStudy:
    name: str
    folder: Path
    expected_urgency: str
    true_bleed_ml: float | None
    instances: int
    study_instance_uid: str
    truth: str = ""
    """What the phantom holds, in words (shown beside the worklist's verdict)."""


def make_study(name: str, out_dir: Path, *, seed: int, bleed_ml: float | None,
               kind: str = "head", patient_name: str = "DEMO^PATIENT",
               patient_id: str = "DEMO-0001", accession_number: str = "DEMOACC0001",
               grid: tuple[int, int, int] | None = None,
               spacing: tuple[float, float, float] | None = None,
               bleed_kind: str = "random", mass_mm: float | None = None,
               labels: tuple[str, str] | None = None) -> DemoStudy:
    """Write one phantom CT study under ``out_dir/name`` (a head, or a chest with a nodule
    of ``mass_mm`` when given). ``labels`` = (Study Description, Body Part Examined)
    replaces the kind's own, e.g. to send a study no routing rule takes."""
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
        plan = NodulePlan(diameters_mm=(mass_mm,), decoy_trees=5) if mass_mm else None
        hu, info = generate_chest_ct(seed, shape=shape, spacing=sp, nodules=plan)
        true_ml = None
        descr, series_descr, body_part = "CT CHEST WO CONTRAST", "Axial 5mm lung", "CHEST"
        expected = "urgent" if mass_mm and mass_mm >= 30 else "negative"
    if labels is not None:
        descr, body_part = labels
    paths = write_ct_series(
        hu, sp, folder, patient_name=patient_name, patient_id=patient_id,
        accession_number=accession_number, study_description=descr,
        series_description=series_descr, body_part_examined=body_part,
        origin=(float(info["origin"][0]), float(info["origin"][1]), float(info["origin"][2])))
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    if kind == "head":
        truth = f"bleed {true_ml:.1f} mL" if true_ml else "no bleed"
    else:
        truth = f"{mass_mm:g} mm lung mass" if mass_mm else "no nodule"
    return DemoStudy(name, folder, expected, true_ml, len(paths), study_uid, truth)


def make_brain_mr(name: str, out_dir: Path, *, seed: int, tumour_ml: float | None,
                  patient_name: str, patient_id: str, accession_number: str) -> DemoStudy:
    """A FLAIR-like brain MR series, with a tumour (and its mass effect) when a volume is given."""
    folder = out_dir / name
    image, _, _, info = generate_brain_mr(seed, tumour_ml=tumour_ml, shape=MR_GRID,
                                          spacing=MR_SPACING)
    paths = write_mr_series(image, info["spacing"], folder, patient_name=patient_name,
                            patient_id=patient_id, accession_number=accession_number,
                            study_description="MR BRAIN WO CONTRAST",
                            series_description="AX FLAIR", body_part_examined="BRAIN",
                            origin=info["origin"])
    study_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    truth = (f"tumour {info['tumour_ml']:.0f} mL, midline shift "
             f"{info['midline_shift_mm']:.1f} mm" if tumour_ml else "no tumour")
    return DemoStudy(name, folder, "urgent" if tumour_ml else "negative", None, len(paths),
                     study_uid, truth)


def make_mammogram(name: str, out_dir: Path, *, seed: int, mass: tuple[str, str, float] | None,
                   patient_name: str, patient_id: str, accession_number: str) -> DemoStudy:
    """A four-view screening mammogram (R/L × CC/MLO, one series, MONOCHROME1 like most
    vendors), with a spiculated mass on the view ``mass`` = (laterality, view, mm)."""
    folder = out_dir / name
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    for number, (laterality, view) in enumerate(MG_VIEWS, start=1):
        diameter = mass[2] if mass and mass[:2] == (laterality, view) else None
        image, _, info = generate_mammogram(
            [seed, number], shape=MG_SHAPE, view=view, laterality=laterality,
            mass_diameter_mm=diameter, margin="spiculated" if diameter else None)
        write_mammogram(image, info["pixel_spacing_mm"], folder / f"{laterality}{view}.dcm",
                        laterality=laterality, view=view, photometric="MONOCHROME1",
                        bits_stored=14, patient_name=patient_name, patient_id=patient_id,
                        accession_number=accession_number, study_instance_uid=study_uid,
                        series_instance_uid=series_uid, instance_number=number)
    truth = f"{mass[2]:g} mm spiculated mass, {mass[0]} {mass[1]}" if mass else "no mass"
    return DemoStudy(name, folder, "urgent" if mass else "negative", None, len(MG_VIEWS),
                     study_uid, truth)


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
                     None, 1, study_uid,
                     "pneumothorax" if pneumothorax_size is not None else "no pneumothorax")


def make_demo_studies(out_dir: Path) -> list[DemoStudy]:
    """One study per detector: three head CTs (a large bleed, a small bleed, a normal), a
    chest CT with a lung mass, a chest radiograph with a pneumothorax, a brain MR with a
    tumour and a four-view mammogram with a mass."""
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
        make_study("chest-ct-mass", out_dir, seed=104, bleed_ml=None, kind="chest",
                   mass_mm=34.0, patient_name="DEMO^CHEST", patient_id="DEMO-0104",
                   accession_number="DEMOACC0104"),
        make_radiograph("chest-xr-pneumothorax", out_dir, seed=105, pneumothorax_size=0.7,
                        patient_name="DEMO^XRAY", patient_id="DEMO-0105",
                        accession_number="DEMOACC0105"),
        make_brain_mr("brain-mr-tumour", out_dir, seed=106, tumour_ml=40.0,
                      patient_name="DEMO^MR", patient_id="DEMO-0106",
                      accession_number="DEMOACC0106"),
        make_mammogram("mammo-mass", out_dir, seed=107, mass=("L", "MLO", 25.0),
                       patient_name="DEMO^MAMMO", patient_id="DEMO-0107",
                       accession_number="DEMOACC0107"),
    ]
