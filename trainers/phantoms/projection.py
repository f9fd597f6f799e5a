"""What the phantom writers of projection radiographs share: one-frame CR, DX and MG files.

:func:`trainers.phantoms.chest_xr.write_chest_radiograph` and
:func:`trainers.phantoms.mammo.write_mammogram` check their own inputs (modality, view,
laterality…), build the common modules with :func:`projection_dataset` (Patient, General
Study, General Series, General Equipment, General Acquisition, General Image, Image Pixel,
VOI LUT, SOP Common), add the DX family's with :func:`add_dx_image_modules` where the IOD has
them, then their own attributes, and write the file with :func:`save_part10`.

pydicom is imported inside the functions, like the writers it serves, so that importing a
phantom module stays cheap.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset


def _alternatives(values: tuple[int, ...]) -> str:
    return " or ".join([", ".join(str(v) for v in values[:-1]), str(values[-1])])


def projection_dataset(
    image: np.ndarray,
    pixel_spacing_mm: float,
    *,
    sop_class: str,
    modality: str,
    bits_stored: int,
    allowed_bits: tuple[int, ...],
    photometric: str,
    patient_name: str,
    patient_id: str,
    patient_sex: str,
    accession_number: str,
    study_description: str,
    series_description: str,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    study_datetime: datetime | None,
    series_number: int,
    instance_number: int,
    body_part: str,
    software_version: str,
    kvp: str,
) -> Dataset:
    """Check the inputs common to every projection writer, then return the dataset of a
    [0, 1] display-sense ``image`` stored as unsigned ``bits_stored``-bit integers
    (``MONOCHROME1``: inverted) with the modules every projection IOD has. Raises
    ``ValueError`` naming the attribute when an input cannot be encoded."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    from trainers.phantoms.dicom import _check_text, _check_uid, _ds_number

    if bits_stored not in allowed_bits:
        raise ValueError(f"BitsStored must be {_alternatives(allowed_bits)}, got {bits_stored}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"PhotometricInterpretation {photometric!r} is not greyscale")
    if not isinstance(image, np.ndarray) or image.ndim != 2 or not np.isfinite(image).all():
        raise ValueError("image must be a finite 2-D array [rows, columns]")
    if not (math.isfinite(pixel_spacing_mm) and pixel_spacing_mm > 0):
        raise ValueError(f"PixelSpacing must be positive, got {pixel_spacing_mm}")
    for attribute, value, limit in (
        ("PatientName", patient_name, 320),
        ("PatientID", patient_id, 64),
        ("AccessionNumber", accession_number, 16),
        ("StudyDescription", study_description, 64),
        ("SeriesDescription", series_description, 64),
    ):
        _check_text(attribute, value, limit)
    _check_uid("StudyInstanceUID", study_instance_uid)
    _check_uid("SeriesInstanceUID", series_instance_uid)

    top = 2**bits_stored - 1
    stored = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    when = study_datetime or datetime.now()
    date, clock = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds = Dataset()
    if any(not t.isascii() for t in (patient_name, study_description, series_description)):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, clock
    # Patient (C.7.1.1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient_sex
    # General Study (C.7.2.1)
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.StudyDate, ds.StudyTime = date, clock
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = accession_number
    ds.StudyDescription = study_description
    # General Series (C.7.3.1)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, clock
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = body_part
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "triage-node phantom"
    ds.ManufacturerModelName = f"synthetic {modality}"
    ds.SoftwareVersions = software_version
    # General Acquisition (C.7.10.1) / General Image (C.7.6.1)
    ds.AcquisitionDate, ds.AcquisitionTime = date, clock
    ds.ContentDate, ds.ContentTime = date, clock
    ds.InstanceNumber = instance_number
    ds.BurnedInAnnotation = "NO"
    ds.KVP = kvp
    # Image Pixel (C.7.6.3)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored.astype("<u2").tobytes()
    # VOI LUT (C.11.2): a window over the image's own range, in stored-value units.
    lo, hi = float(np.percentile(stored, 0.5)), float(np.percentile(stored, 99.5))
    ds.WindowCenter = _ds_number((lo + hi) / 2)
    ds.WindowWidth = _ds_number(max(hi - lo, 1.0))
    return ds


def sct_code(value: str, meaning: str) -> Dataset:
    """A code sequence item in SNOMED CT."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "SCT"
    item.CodeMeaning = meaning
    return item


def add_dx_image_modules(
    ds: Dataset,
    *,
    region: tuple[str, str],
    view: tuple[str, str],
    detector_type: str,
    imager_pixel_spacing: list[str],
) -> None:
    """The modules of the DX family (DX and MG For Presentation): DX Series' presentation
    intent, DX Anatomy Imaged (``region``: SCT code, meaning), DX Image, DX Detector,
    Acquisition Context, and a View Code Sequence (``view``) with no modifiers."""
    photometric = ds.PhotometricInterpretation
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.AnatomicRegionSequence = [sct_code(*region)]
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.DetectorType = detector_type
    ds.ImagerPixelSpacing = imager_pixel_spacing
    ds.AcquisitionContextSequence = []
    item = sct_code(*view)
    item.ViewModifierCodeSequence = []
    ds.ViewCodeSequence = [item]


def save_part10(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (Explicit VR Little Endian) with its file meta."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = UID(ds.SOPInstanceUID)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "TRIAGE_NODE_01"
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
