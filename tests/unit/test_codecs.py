"""Every transfer syntax the receiver accepts decodes in the imaging stage (PS3.5 A.4, 10.x).

The receiver stores instances as received; ``imaging.loader`` decodes them with pydicom and the
plugins in pyproject (pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle). Each case decodes
real encoded data — pydicom's own test files, plus HTJ2K files made with OpenJPH
(``tests/data/htj2k``, because pydicom-data has none offline) — and compares it with the
uncompressed reference: lossless syntaxes exactly, lossy ones within a tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from triage_node.imaging.loader import load_series

HTJ2K_DIR = Path(__file__).resolve().parents[1] / "data" / "htj2k"


def _file(name: str) -> Path:
    local = HTJ2K_DIR / name
    if local.exists():
        return local
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(str(path))


@dataclass(frozen=True)
class Case:
    syntax: str
    encoded: str
    reference: str | None
    max_mean_error: float
    """Mean |decoded - reference| allowed, as a fraction of the reference's value range
    (0 = must be identical)."""
    greyscale: bool = True


CASES = [
    Case("1.2.840.10008.1.2", "MR_small_implicit.dcm", "MR_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.1", "MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0.0),
    Case("1.2.840.10008.1.2.2", "MR_small_bigendian.dcm", "MR_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.2", "emri_small_big_endian.dcm", "emri_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.1.99", "image_dfl.dcm", None, 0.0),
    Case("1.2.840.10008.1.2.4.50", "SC_rgb_dcmtk_+eb+cr.dcm", "SC_rgb_dcmtk_ebcr_dcmd.dcm",
         0.01, greyscale=False),
    Case("1.2.840.10008.1.2.4.50", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 0.01, greyscale=False),
    Case("1.2.840.10008.1.2.4.51", "JPGExtended.dcm", "JPEG-LL.dcm", 0.02),
    Case("1.2.840.10008.1.2.4.70", "SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0.0, greyscale=False),
    Case("1.2.840.10008.1.2.4.70", "JPGLosslessP14SV1_1s_1f_8b.dcm", None, 0.0),
    Case("1.2.840.10008.1.2.4.80", "MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.4.80", "emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.4.81", "SC_rgb_jls_lossy_line.dcm", "SC_rgb.dcm", 0.01,
         greyscale=False),
    Case("1.2.840.10008.1.2.4.81", "JPEGLSNearLossless_16.dcm", None, 0.0),
    Case("1.2.840.10008.1.2.4.90", "MR_small_jp2klossless.dcm", "MR_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.4.90", "RG1_J2KR.dcm", "RG1_UNCR.dcm", 0.0),
    Case("1.2.840.10008.1.2.4.90", "emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.4.91", "MR2_J2KI.dcm", "MR2_UNCI.dcm", 0.01),
    Case("1.2.840.10008.1.2.4.91", "693_J2KI.dcm", "693_UNCI.dcm", 0.01),
    Case("1.2.840.10008.1.2.4.201", "MR_small_htj2k_lossless.dcm", "MR_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.4.202", "MR_small_htj2k_lossless_rpcl.dcm", "MR_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.4.203", "MR_small_htj2k_lossy.dcm", "MR_small.dcm", 0.01),
    Case("1.2.840.10008.1.2.5", "MR_small_RLE.dcm", "MR_small.dcm", 0.0),
    Case("1.2.840.10008.1.2.5", "emri_small_RLE.dcm", "emri_small.dcm", 0.0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.syntax}-{c.encoded}")
def test_decodes_like_the_reference(case: Case) -> None:
    ds = pydicom.dcmread(_file(case.encoded))
    assert ds.file_meta.TransferSyntaxUID == case.syntax
    decoded = ds.pixel_array.astype(np.float64)
    assert decoded.size == int(ds.Rows) * int(ds.Columns) * int(
        ds.get("NumberOfFrames", 1) or 1
    ) * int(ds.SamplesPerPixel)
    if case.reference is None:
        # No uncompressed twin in pydicom's data: it must at least be a real image.
        assert decoded.std() > 0
        return
    reference = pydicom.dcmread(_file(case.reference)).pixel_array.astype(np.float64)
    assert decoded.shape == reference.shape
    if case.max_mean_error == 0.0:
        np.testing.assert_array_equal(decoded, reference)
    else:
        value_range = float(reference.max() - reference.min())
        mean_error = float(np.abs(decoded - reference).mean()) / value_range
        assert mean_error <= case.max_mean_error
        # Lossy, yet still the same picture.
        assert np.corrcoef(decoded.ravel(), reference.ravel())[0, 1] > 0.98


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.greyscale and c.reference], ids=lambda c: c.encoded
)
def test_load_series_gives_the_same_volume_as_the_reference(case: Case) -> None:
    decoded = load_series([_file(case.encoded)])
    reference = load_series([_file(case.reference or "")])
    assert decoded.shape == reference.shape
    assert decoded.spacing == pytest.approx(reference.spacing)
    if case.max_mean_error == 0.0:
        np.testing.assert_array_equal(decoded.array, reference.array)
    else:
        value_range = float(reference.array.max() - reference.array.min())
        error = float(np.abs(decoded.array - reference.array).mean()) / value_range
        assert error <= case.max_mean_error


def test_deflated_written_by_pydicom_decodes_exactly(tmp_path: Path) -> None:
    reference = pydicom.dcmread(_file("MR_small.dcm"))
    deflated = tmp_path / "deflated.dcm"
    copy = pydicom.dcmread(_file("MR_small.dcm"))
    copy.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    copy.save_as(deflated, enforce_file_format=True)
    assert deflated.stat().st_size < _file("MR_small.dcm").stat().st_size

    volume = load_series([deflated])
    np.testing.assert_array_equal(volume.array[0], reference.pixel_array.astype(np.float32))


@pytest.mark.parametrize(
    ("syntax", "plugin"),
    [
        ("1.2.840.10008.1.2.4.50", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.51", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.57", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.70", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.80", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.81", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.90", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.91", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.201", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.202", "pylibjpeg"),
        ("1.2.840.10008.1.2.4.203", "pylibjpeg"),
        ("1.2.840.10008.1.2.5", "pylibjpeg"),
    ],
)
def test_decoder_plugin_from_pyproject_is_installed(syntax: str, plugin: str) -> None:
    """The plugin docs/conformance.md names is present (not only a slower fallback)."""
    assert plugin in get_decoder(UID(syntax)).available_plugins
