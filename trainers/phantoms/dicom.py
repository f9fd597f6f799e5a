"""Write synthetic volumes as realistic single-frame CT or MR Image Storage series.

``write_series`` writes both; ``write_ct_series`` (HU) and ``write_mr_series`` (arbitrary MR
units, e.g. the FLAIR-like phantoms of ``brain_mr.py``) name the modality. An MR series
follows the MR Image IOD (PS3.3 A.4) instead of the CT Image IOD: MR Image (C.8.3.1) with
FLAIR acquisition attributes instead of CT Image, unsigned 16-bit pixels and no rescale.

The series follow the CT Image IOD (PS3.3 A.3) with every Type 1 and Type 2 attribute of
its mandatory modules present, so ``dciodvfy`` reports no errors:

* Patient (C.7.1.1), General Study (C.7.2.1), General Series (C.7.3.1),
  Frame of Reference (C.7.4.1), General Equipment (C.7.5.1), General Acquisition
  (C.7.10.1), General Image (C.7.6.1), Image Plane (C.7.6.2), Image Pixel (C.7.6.3),
  CT Image (C.8.2.1), VOI LUT (C.11.2) and SOP Common (C.12.1).
* Files are PS3.10 files with Explicit VR Little Endian (PS3.5 A.2) file meta.

Geometry is axial (Image Orientation (Patient) ``1\\0\\0\\0\\1\\0``), slices stacked along
+z (the normal of the orientation, feet to head in LPS), so the array order ``[z, y, x]`` is
also the order the imaging stage sorts them into (PS3.3 C.7.6.2.1.1).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

__all__ = ["write_ct_series", "write_mr_series", "write_series"]

# Unsigned 12-bit storage with intercept -1024 is what most scanners write; it needs the HU
# range to fit in [-1024, 3071]. Anything outside falls back to signed 16-bit, intercept 0.
_U12_INTERCEPT = -1024
_U12_MAX_HU = 4095 + _U12_INTERCEPT
_I16_MIN, _I16_MAX = -32768, 32767

_CS_RE = re.compile(r"^[A-Z0-9_ ]*$")
_DA_RE = re.compile(r"^(\d{8})?$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_IMPLEMENTATION_VERSION = "TRIAGE_NODE_01"


def _check_text(attribute: str, value: str | None, max_len: int) -> None:
    if value is None:
        return
    if not isinstance(value, str):
        raise ValueError(f"{attribute} must be a str, got {type(value).__name__}")
    if len(value) > max_len:
        raise ValueError(f"{attribute} is {len(value)} characters long; at most {max_len}")
    if "\\" in value or any(ord(c) < 0x20 for c in value):
        raise ValueError(f"{attribute} must not contain backslashes or control characters")


def _check_uid(attribute: str, value: str | None) -> None:
    if value is None:
        return
    if len(value) > 64 or not _UID_RE.match(value):
        raise ValueError(f"{attribute} {value[:70]!r} is not a valid UID (PS3.5 9.1)")


def _storage_for(hu: np.ndarray) -> tuple[np.dtype, int, int, int]:
    """Choose (dtype, Pixel Representation, Bits Stored, Rescale Intercept) that hold ``hu``."""
    lo, hi = int(hu.min()), int(hu.max())
    if lo >= _U12_INTERCEPT and hi <= _U12_MAX_HU:
        return np.dtype("<u2"), 0, 12, _U12_INTERCEPT
    if lo >= _I16_MIN and hi <= _I16_MAX:
        return np.dtype("<i2"), 1, 16, 0
    raise ValueError(
        f"hu values span [{lo}, {hi}]; CT Pixel Data holds at most a signed 16-bit range"
    )


def _ds_number(value: float) -> str:
    """Format a float as a DS (PS3.5 6.2: at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    if len(text) > 16:
        text = f"{value:.10g}"
    return text


def write_ct_series(
    hu: np.ndarray, spacing: tuple[float, float, float], out_dir: Path, **kwargs: Any
) -> list[Path]:
    """Write ``hu`` (Hounsfield units) as a CT Image Storage series (see :func:`write_series`)."""
    return write_series(hu, spacing, out_dir, modality="CT", **kwargs)


def write_mr_series(
    image: np.ndarray,
    spacing: tuple[float, float, float],
    out_dir: Path,
    *,
    window: tuple[float, float] | None = None,
    **kwargs: Any,
) -> list[Path]:
    """Write ``image`` (non-negative MR units) as an MR Image Storage series of a 2-D axial
    FLAIR acquisition (see :func:`write_series`); the window defaults to the image's
    1st–99.5th percentiles."""
    if window is None:
        lo, hi = (float(v) for v in np.percentile(image, [1.0, 99.5]))
        window = ((lo + hi) / 2.0, max(hi - lo, 1.0))
    return write_series(image, spacing, out_dir, modality="MR", window=window, **kwargs)


def write_series(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    out_dir: Path,
    *,
    modality: Literal["CT", "MR"] = "CT",
    patient_name: str,
    patient_id: str,
    accession_number: str,
    study_description: str,
    series_description: str,
    body_part_examined: str,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    patient_birth_date: str = "",
    patient_sex: str = "O",
    institution_name: str | None = None,
    institutional_department_name: str | None = None,
    study_datetime: datetime | None = None,
    series_number: int = 1,
    origin: tuple[float, float, float] | None = None,
    window: tuple[float, float] = (40.0, 80.0),
) -> list[Path]:
    """Write ``hu`` (indexed ``[z, y, x]``) as a CT (Hounsfield units) or MR (``modality``;
    arbitrary units, stored unsigned 16-bit without rescale) Image Storage series.

    One PS3.10 file per slice is written to ``out_dir`` (created if missing) as
    ``CT0001.dcm``, ``CT0002.dcm``… (``MR0001.dcm``… for MR) in slice order; the paths are
    returned in that order.

    ``spacing`` is ``(slice spacing, row spacing, column spacing)`` in mm; Slice Thickness
    equals the slice spacing (contiguous slices). ``origin`` is the Image Position (Patient)
    of the first slice; by default the image is centred on the z axis in x and y and the
    first slice is at z = 0. Values are rounded to integer HU and stored as unsigned 12-bit
    with Rescale Intercept -1024 when they fit in [-1024, 3071], otherwise as signed 16-bit
    with intercept 0 (Rescale Slope is always 1). ``window`` is the (centre, width) written
    to the VOI LUT module; the default is a brain window.

    UIDs not given are generated (random, under pydicom's root). ``patient_birth_date`` is a
    DA (``YYYYMMDD``) or empty; ``patient_sex`` is ``M``, ``F``, ``O`` or empty (PS3.3
    C.7.1.1). Raises ``ValueError`` naming the attribute when an input cannot be encoded.
    """
    _validate(
        hu,
        spacing,
        patient_name=patient_name,
        patient_id=patient_id,
        accession_number=accession_number,
        study_description=study_description,
        series_description=series_description,
        body_part_examined=body_part_examined,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        patient_birth_date=patient_birth_date,
        patient_sex=patient_sex,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        series_number=series_number,
        origin=origin,
        window=window,
    )
    n_slices, rows, cols = (int(n) for n in hu.shape)
    dz, dy, dx = (float(s) for s in spacing)
    if origin is None:
        origin = (-(cols - 1) * dx / 2.0, -(rows - 1) * dy / 2.0, 0.0)
    when = study_datetime or datetime.now()
    study_uid = study_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()
    for_uid = frame_of_reference_uid or generate_uid()

    rounded = np.rint(hu) if np.issubdtype(hu.dtype, np.floating) else hu
    if modality == "MR":
        if rounded.min() < 0 or rounded.max() > 65535:
            raise ValueError("MR values must lie in [0, 65535] (unsigned 16-bit, no rescale)")
        dtype, pixel_representation, bits_stored, intercept = np.dtype("<u2"), 0, 16, 0
    else:
        dtype, pixel_representation, bits_stored, intercept = _storage_for(rounded)
    # One conversion for the whole volume: per-slice conversions cost more than the writes.
    stored = (rounded.astype(np.int32) - intercept).astype(dtype)

    base = _series_dataset(
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date=patient_birth_date,
        patient_sex=patient_sex,
        accession_number=accession_number,
        study_description=study_description,
        series_description=series_description,
        body_part_examined=body_part_examined,
        study_uid=study_uid,
        series_uid=series_uid,
        for_uid=for_uid,
        institution_name=institution_name,
        institutional_department_name=institutional_department_name,
        series_number=series_number,
        when=when,
        modality=modality,
    )
    base.Rows = rows
    base.Columns = cols
    base.BitsAllocated = 16
    base.BitsStored = bits_stored
    base.HighBit = bits_stored - 1
    base.PixelRepresentation = pixel_representation
    if modality == "CT":
        base.RescaleIntercept = _ds_number(intercept)
    else:
        base.SpacingBetweenSlices = _ds_number(dz)
    base.PixelSpacing = [_ds_number(dy), _ds_number(dx)]
    base.SliceThickness = _ds_number(dz)
    base.WindowCenter = _ds_number(window[0])
    base.WindowWidth = _ds_number(window[1])

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(n_slices):
        ds = Dataset()
        # Copy element by element: a shallow Dataset(base) would share DataElement objects,
        # and assigning a per-slice value would then change every slice.
        for elem in base:
            ds.add_new(elem.tag, elem.VR, elem.value)
        sop_uid = generate_uid()
        z = origin[2] + k * dz
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_number(origin[0]), _ds_number(origin[1]), _ds_number(z)]
        ds.SliceLocation = _ds_number(z)
        ds.PixelData = stored[k].tobytes()
        ds.file_meta = _file_meta(sop_uid, base.SOPClassUID)
        path = out_dir / f"{modality}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _validate(
    hu: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    patient_name: str,
    patient_id: str,
    accession_number: str,
    study_description: str,
    series_description: str,
    body_part_examined: str,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    frame_of_reference_uid: str | None,
    patient_birth_date: str,
    patient_sex: str,
    institution_name: str | None,
    institutional_department_name: str | None,
    series_number: int,
    origin: tuple[float, float, float] | None,
    window: tuple[float, float],
) -> None:
    if not isinstance(hu, np.ndarray) or hu.ndim != 3:
        raise ValueError("hu must be a 3-D numpy array indexed [z, y, x]")
    if min(hu.shape) < 1 or hu.shape[1] > 65535 or hu.shape[2] > 65535:
        raise ValueError(f"hu shape {hu.shape} cannot be stored as Rows/Columns (US)")
    if not (np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)):
        raise ValueError(f"hu must hold integers or floats, not {hu.dtype}")
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        raise ValueError("hu contains NaN or infinite values")
    if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(
            f"spacing (PixelSpacing/SliceThickness) must be 3 positive mm values, got {spacing!r}"
        )
    if origin is not None and (len(origin) != 3 or not all(np.isfinite(o) for o in origin)):
        raise ValueError(f"origin (ImagePositionPatient) must be 3 finite values, got {origin!r}")
    if len(window) != 2 or not window[1] >= 1:
        raise ValueError(f"window (WindowCenter, WindowWidth) needs a width >= 1, got {window!r}")
    # PN components are at most 64 characters each (PS3.5 6.2); the whole value is checked.
    _check_text("PatientName", patient_name, 5 * 64)
    _check_text("PatientID", patient_id, 64)
    _check_text("AccessionNumber", accession_number, 16)
    _check_text("StudyDescription", study_description, 64)
    _check_text("SeriesDescription", series_description, 64)
    _check_text("InstitutionName", institution_name, 64)
    _check_text("InstitutionalDepartmentName", institutional_department_name, 64)
    _check_text("BodyPartExamined", body_part_examined, 16)
    if not _CS_RE.match(body_part_examined):
        raise ValueError(
            f"BodyPartExamined {body_part_examined!r} must be upper-case CS text "
            "(A-Z, 0-9, space, underscore), e.g. HEAD"
        )
    if not _DA_RE.match(patient_birth_date):
        raise ValueError(f"PatientBirthDate {patient_birth_date!r} must be YYYYMMDD or empty")
    if patient_sex not in ("M", "F", "O", ""):
        raise ValueError(f"PatientSex {patient_sex!r} must be M, F, O or empty")
    if not 0 <= series_number <= 2**31 - 1:
        raise ValueError(f"SeriesNumber {series_number} is outside the IS range")
    _check_uid("StudyInstanceUID", study_instance_uid)
    _check_uid("SeriesInstanceUID", series_instance_uid)
    _check_uid("FrameOfReferenceUID", frame_of_reference_uid)


def _series_dataset(
    *,
    patient_name: str,
    patient_id: str,
    patient_birth_date: str,
    patient_sex: str,
    accession_number: str,
    study_description: str,
    series_description: str,
    body_part_examined: str,
    study_uid: str,
    series_uid: str,
    for_uid: str,
    institution_name: str | None,
    institutional_department_name: str | None,
    series_number: int,
    when: datetime,
    modality: str = "CT",
) -> Dataset:
    """The attributes shared by every slice, module by module (PS3.3 A.3.3, A.4.3 for MR)."""
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    texts = (
        patient_name,
        patient_id,
        study_description,
        series_description,
        institution_name or "",
        institutional_department_name or "",
    )
    ds = Dataset()
    # SOP Common (C.12.1): declare UTF-8 only when needed; plain ASCII is the default repertoire.
    if any(not t.isascii() for t in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "OTHER"]
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # General Study (C.7.2.1)
    ds.StudyDate = date
    ds.StudyTime = time
    ds.AccessionNumber = accession_number
    # General Series (C.7.3.1); Series Date/Time are Type 3 but viewers show them.
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.AcquisitionDate = date
    ds.AcquisitionTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.Modality = modality
    # General Equipment (C.7.5.1)
    ds.Manufacturer = "triage-node phantom"
    if institution_name is not None:
        ds.InstitutionName = institution_name
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    if institutional_department_name is not None:
        ds.InstitutionalDepartmentName = institutional_department_name
    ds.ManufacturerModelName = f"synthetic {modality}"
    # Patient (C.7.1.1)
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = patient_sex
    ds.BodyPartExamined = body_part_examined
    ds.SoftwareVersions = "1"
    if modality == "CT":  # CT Image (C.8.2.1)
        ds.KVP = "120"
        ds.ConvolutionKernel = "STANDARD"
    else:  # MR Image (C.8.3.1): a 2-D turbo spin echo FLAIR (inversion recovery)
        ds.ScanningSequence = ["SE", "IR"]
        ds.SequenceVariant = ["SK", "SP"]
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SequenceName = "tir2d1_16"
        ds.RepetitionTime = "9000"
        ds.EchoTime = "120"
        ds.InversionTime = "2500"
        ds.EchoTrainLength = 16
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = "63.87"
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
        ds.FlipAngle = "150"
    # Patient Position is Type 2C, required for CT and MR (C.7.3.1.1.2).
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    # Image Pixel (C.7.6.3) / CT Image (C.8.2.1.1.x): one grey sample per pixel.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BurnedInAnnotation = "NO"
    if modality == "CT":
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    return ds


def _file_meta(sop_instance_uid: str, sop_class_uid: str = CTImageStorage) -> FileMetaDataset:
    """PS3.10 7.1 File Meta Information for one CT or MR instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta
