"""The detector's heatmap over a radiograph, as an RGB Secondary Capture (PS3.3 A.8.1).

Which object, and why a Secondary Capture:

* A 2D classifier's heatmap (e.g. Grad-CAM) says *where the model looked*, not a calibrated
  quantity nor a delineated finding, so it is not a SEG (no finding boundary) and not SR
  measurements. It is there for the reader's eyes.
* An RGB Secondary Capture — the source image windowed to grey with the heatmap blended in a
  colour map — is shown by *every* viewer and PACS, including those that render neither
  SEG, SR nor Parametric Maps, and needs no overlay support: what the radiologist sees is
  exactly what the node drew. That is the object this module writes.
* A Parametric Map (float map + real-world value mapping) would let OHIF/Slicer fuse the raw
  map with a colour LUT of the reader's choice, but most PACS viewers do not display it, and
  its values would have to be labelled "arbitrary units" since a CAM has no physical unit.
  It is not written (yet); the SC is what a radiologist can open anywhere.

Pixels: the source instance's modality values are windowed with its first Window
Center/Width (or its 0.5–99.5 percentiles when none), inverted for MONOCHROME1 so that the
picture looks like the source does in a viewer (:func:`grey_image`), then blended with a
"jet" colour map whose opacity ramps from 0 at heatmap value 0.2 to 0.6 at 1.0 — low
attention leaves the image untouched, so the reader still sees the anatomy. Burned In
Annotation is YES (the colours are annotation), Image Type DERIVED\\SECONDARY, and the
Source Image Sequence / Derivation Code Sequence say which source instance it was derived
from and how.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian

from triage_node.detectors.findings import DetectorResult
from triage_node.errors import EncodingError
from triage_node.imaging.volume import Volume
from triage_node.results.content import check_inputs, encoding_step, result_identity
from triage_node.results.device import AlgorithmInfo, EncodeOptions
from triage_node.results.identity import ResultKind

__all__ = ["HeatmapEncoder", "blend_heatmap", "grey_image"]

_JET_STOPS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_RGB = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]],
    dtype=np.float32,
)
_ALPHA_FLOOR = 0.2
_ALPHA_MAX = 0.6
_SOURCE_FOR_PROCESSING = hd.sr.CodedConcept(
    "121322", "DCM", "Source image for image processing operation"
)
"""Purpose of Reference of the Source Image Sequence item (PS3.16 CID 7202)."""
_PIXEL_ADDITION = hd.sr.CodedConcept("113042", "DCM", "Pixel by pixel addition")
"""Derivation Code (PS3.16 CID 7203): alpha blending is a weighted pixel-wise addition."""
_SERIES_DESCRIPTION = "AI triage heatmap"


def _first(value: object) -> float | None:
    """First value of a possibly multi-valued DS element, or ``None``."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def grey_image(source: Dataset, fallback: np.ndarray) -> np.ndarray:
    """The source image as a viewer shows it, as floats in [0, 1] (PS3.3 C.11.2.1.2.1).

    Decoded from the source instance itself — modality LUT, then a linear window with its
    first Window Center/Width (its 0.5–99.5 percentiles when it has none), inverted for
    MONOCHROME1 — so the picture does not depend on how the imaging stage normalised the
    volume. Without pixel data in the source dataset, ``fallback`` (the volume's slice,
    higher = brighter) is windowed with its percentiles.
    """
    if "PixelData" in source:
        values = np.asarray(apply_modality_lut(source.pixel_array, source), dtype=np.float32)
        invert = str(source.get("PhotometricInterpretation", "")) == "MONOCHROME1"
        center = _first(source.get("WindowCenter"))
        width = _first(source.get("WindowWidth"))
    else:
        values, invert, center, width = np.asarray(fallback, np.float32), False, None, None
    if center is not None and width is not None and width >= 1:
        low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    else:
        low, high = (float(v) for v in np.percentile(values, [0.5, 99.5]))
    span = high - low if high > low else 1.0
    grey = np.clip((values - low) / span, 0.0, 1.0)
    return 1.0 - grey if invert else grey


def blend_heatmap(grey: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend ``heatmap`` (values in [0, 1]) into ``grey`` (in [0, 1]): uint8 RGB [rows, cols, 3]."""
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    colour = np.stack(
        [np.interp(heat, _JET_STOPS, _JET_RGB[:, c]) for c in range(3)], axis=-1
    ).astype(np.float32)
    alpha = _ALPHA_MAX * np.clip((heat - _ALPHA_FLOOR) / (1.0 - _ALPHA_FLOOR), 0.0, 1.0)
    alpha = alpha[..., None]
    base = (np.asarray(grey, dtype=np.float32) * 255.0)[..., None]
    rgb = base * (1.0 - alpha) + colour * alpha
    return np.asarray(np.clip(np.rint(rgb), 0, 255), dtype=np.uint8)


class HeatmapEncoder:
    """Encode ``DetectorResult.heatmap`` of a single-image volume as an RGB SC instance.

    ``encode`` returns ``None`` when the result has no heatmap. Multi-slice heatmaps are
    refused: a 3D map belongs in a Parametric Map, not in hundreds of screenshots.
    """

    def __init__(self, algorithm: AlgorithmInfo, options: EncodeOptions | None = None) -> None:
        if not isinstance(algorithm, AlgorithmInfo):
            raise ValueError("HeatmapEncoder algorithm must be an AlgorithmInfo")
        self._algorithm = algorithm
        self._options = options or EncodeOptions()

    def encode(self, volume: Volume, result: DetectorResult) -> hd.sc.SCImage | None:
        """Build the heatmap SC of ``result`` over ``volume``'s only image, or ``None``."""
        if result.heatmap is None:
            return None
        check_inputs(volume, result, self._algorithm)
        heatmap = np.asarray(result.heatmap)
        if heatmap.shape != volume.shape:
            raise EncodingError(
                f"DetectorResult.heatmap has shape {heatmap.shape}, volume is {volume.shape}"
            )
        if volume.shape[0] != 1:
            raise EncodingError(
                "DetectorResult.heatmap: only single-image (2D) volumes get a heatmap image, "
                f"this volume has {volume.shape[0]} slices"
            )
        if not np.all(np.isfinite(heatmap)) or heatmap.min() < 0.0 or heatmap.max() > 1.0:
            raise EncodingError("DetectorResult.heatmap values must be finite and in [0, 1]")

        source = volume.source_datasets[0]
        algorithm = self._algorithm
        device = algorithm.device
        identity = result_identity(volume, algorithm, self._options)
        rgb = blend_heatmap(grey_image(source, volume.array[0]), heatmap[0])

        with encoding_step("heatmap Secondary Capture"):
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=source,
                pixel_array=rgb,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                # PATIENT wants an orientation; the source's own value is copied below.
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                patient_orientation=("L", "F"),
                series_instance_uid=identity.series_instance_uid_for(ResultKind.HEATMAP),
                series_number=self._options.heatmap_series_number,
                sop_instance_uid=identity.sop_instance_uid_for(ResultKind.HEATMAP),
                instance_number=1,
                manufacturer=device.manufacturer,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                series_description=f"{_SERIES_DESCRIPTION} {algorithm.name}"[:64],
                manufacturer_model_name=algorithm.name,
                software_versions=[device.software_version, algorithm.version],
                device_serial_number=device.serial_number,
                institution_name=device.institution_name,
                institutional_department_name=device.institutional_department_name,
            )
            # Same pixel grid as the source, so the same orientation (Type 2C: may be empty).
            sc.PatientOrientation = source.get("PatientOrientation", "")
            for keyword in (
                "ImageLaterality",
                "Laterality",
                "BodyPartExamined",
                "RecognizableVisualFeatures",
            ):
                if source.get(keyword):
                    setattr(sc, keyword, source.get(keyword))
            sc.BurnedInAnnotation = "YES"
            sc.LossyImageCompression = "00"
            sc.ImageComments = self._options.disclaimer
            sc.DerivationDescription = (
                f"{source.Modality} image windowed to grey, {algorithm.name} "
                f"{algorithm.version} heatmap blended in (jet colour map)"
            )[:1024]
            sc.DerivationCodeSequence = [_PIXEL_ADDITION]
            reference = Dataset()
            reference.ReferencedSOPClassUID = source.SOPClassUID
            reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
            reference.PurposeOfReferenceCodeSequence = [_SOURCE_FOR_PROCESSING]
            sc.SourceImageSequence = [reference]
        return sc
