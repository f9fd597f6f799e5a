"""The receive path's fast header reader gives what pydicom's path gives, or steps aside.

``read_header`` tries :func:`triage_node.spool.header_scan.scan` first and falls back to
``read_header_with_pydicom``. These tests run both on every file of pydicom's test data, the
bad-input corpus, and thousands of truncations and byte corruptions of real files, and require
the same outcome: the same :class:`InstanceHeader`, or the same error with the same message.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag
from pydicom.values import convert_value

from trainers.phantoms.dicom import write_ct_series
from triage_node.config.models import LimitsConfig
from triage_node.spool.header_scan import TEXT_VRS, ScannedHeader, raw_text, scan
from triage_node.spool.index import (
    _plain,
    header_from_head,
    read_header,
    read_header_with_pydicom,
    scan_head,
)
from triage_node.spool.store import HEAD_BYTES

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "bad-input"
LIMITS = LimitsConfig(max_pixels_per_instance=4096 * 4096)


def pydicom_file(name: str) -> bytes:
    path = get_testdata_file(name, download=False)
    assert isinstance(path, str), name
    return Path(path).read_bytes()


def outcome(read: object, data: bytes) -> object:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return read(data, LIMITS)  # type: ignore[operator]
        except Exception as exc:  # noqa: BLE001 - the outcome compared is the error itself
            return (type(exc).__name__, str(exc))


def assert_same(data: bytes, name: str) -> bool:
    """Both paths agree on ``data``; returns whether the fast path took it."""
    fast = scan(data) is not None
    assert outcome(read_header, data) == outcome(read_header_with_pydicom, data), name
    return fast


def test_every_pydicom_test_file_reads_the_same() -> None:
    taken = checked = 0
    for name in get_testdata_files("*"):
        if not Path(name).is_file():
            continue
        data = Path(name).read_bytes()
        taken += assert_same(data, name)
        checked += 1
    assert checked > 100
    # the common encodings take the fast path (implicit, explicit, encapsulated syntaxes)
    assert taken > 60, taken
    for common in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
                   "MR_small_implicit.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"):
        assert scan(pydicom_file(common)) is not None, common


def test_every_bad_input_file_reads_the_same() -> None:
    files = sorted(CORPUS.glob("*.dcm"))
    assert len(files) >= 20
    for path in files:
        assert_same(path.read_bytes(), path.name)


def test_a_written_ct_series_takes_the_fast_path(tmp_path: Path) -> None:
    hu = np.zeros((2, 64, 64), dtype=np.float32)
    files = write_ct_series(hu, (1.0, 0.7, 0.7), tmp_path, patient_name="SCAN^TEST",
                            patient_id="SCAN1", accession_number="ACC1",
                            study_description="CT", series_description="Axial",
                            body_part_examined="HEAD")
    for path in files:
        assert assert_same(path.read_bytes(), path.name)


CUT_FILES = ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm",
             "rtplan.dcm"]
"""pydicom test files cut at every offset of their header."""


def header_end(scanned: ScannedHeader | None, data: bytes) -> int:
    """Where the scanned header ends: the pixel data element, or the end of the bytes."""
    return scanned.stop_offset if scanned is not None else len(data)


@pytest.mark.parametrize("name", CUT_FILES)
def test_every_truncation_reads_the_same(name: str) -> None:
    """Cut at every offset of the header and at a sample of offsets in the pixel data."""
    data = pydicom_file(name)
    end = header_end(scan(data), data)
    cuts = list(range(0, min(end + 16, len(data))))
    cuts += random.Random(name).sample(range(len(data)), min(200, len(data)))
    for cut in cuts:
        assert_same(data[:cut], f"{name}[:{cut}]")


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm",
                                  "rtplan.dcm"])
def test_corrupted_bytes_read_the_same(name: str) -> None:
    """Random bytes overwritten in the header: lengths, VRs, tags, values, delimiters."""
    data = pydicom_file(name)
    scanned = scan(data)
    limit = scanned.stop_offset + 12 if scanned is not None else len(data)
    rng = random.Random(name)
    for trial in range(600):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(128, min(limit, len(data)))
            mutated[at] = rng.choice([0x00, 0xFF, 0x20, 0x5C, 0x80, rng.randrange(256)])
        assert_same(bytes(mutated), f"{name} trial {trial}")


@pytest.mark.parametrize("vr", sorted(TEXT_VRS))
def test_text_values_convert_as_pydicom_converts_them(vr: str) -> None:
    """Random values built from padding, separators, name delimiters and control characters
    (which Python's ``strip`` treats as white space): ``raw_text`` gives
    pydicom's value, or refuses (ValueError) so that pydicom converts it."""
    rng = random.Random(vr)
    alphabet = [b"A", b"1", b" ", b"\x00", b"\\", b".", b"-", b"+", b"e", b"^", b"=", b"\t",
                b"\n", b"\r", b"\x0b", b"\x0c", b"\x1c", b"\x1f"]
    converted = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3000):
            value = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
            try:
                got = raw_text(value, vr, "ascii")
            except ValueError:
                continue
            ref = convert_value(vr, RawDataElement(BaseTag(0x00100010), vr, len(value), value, 0,
                                                   False, True))
            assert got == (None if ref is None or ref == "" else _plain(ref)), value
            converted += 1
    assert converted > 300


def relabelled(data: bytes, syntax: str) -> bytes:
    """``data`` with its file meta saying ``syntax``; the data set bytes are left as they were
    (a sender that mislabels its encoding)."""
    import io

    import pydicom
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    meta_end = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    ds.file_meta.TransferSyntaxUID = UID(syntax)
    out = DicomBytesIO()
    out.write(data[:132])
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    return out.getvalue() + data[meta_end:]


@pytest.mark.parametrize(("name", "syntax"), [
    ("CT_small.dcm", "1.2.840.10008.1.2"),          # explicit bytes, says implicit
    ("MR_small.dcm", "1.2.840.10008.1.2"),
    ("MR_small_implicit.dcm", "1.2.840.10008.1.2.1"),  # implicit bytes, says explicit
])
def test_a_mislabelled_encoding_reads_the_same(name: str, syntax: str) -> None:
    data = relabelled(pydicom_file(name), syntax)
    assert not assert_same(data, name)  # pydicom's path, which notices and adapts


def test_a_head_read_early_gives_the_header_of_the_whole_file() -> None:
    """The receiver reads the header from an instance's first bytes while the rest arrives
    (``scan_head``): whatever the cut, that is either nothing or exactly what the whole file
    gives, and ``read_header`` finishes the checks on the whole file the same way."""
    early_reads = 0
    for name in get_testdata_files("*"):
        if not Path(name).is_file():
            continue
        data = Path(name).read_bytes()
        whole = scan(data)
        end = header_end(whole, data)
        cuts = {HEAD_BYTES, end, end + 1, end + 8, end + 9, len(data) - 1}
        for cut in sorted(c for c in cuts if 0 < c < len(data)):
            early = scan_head(bytearray(data[:cut]))
            if early is None:
                continue
            early_reads += 1
            assert early == whole, (name, cut)
            assert outcome(lambda d, lim, e=early: read_header(d, lim, e), data) \
                == outcome(read_header, data), (name, cut)
    assert early_reads > 100, early_reads


def test_the_head_and_the_size_decide_as_the_whole_file_does() -> None:
    """The receiver checks an instance read early from its head and its size alone when the
    pixel data has a defined length (``header_from_head``): it either steps aside (None) or
    gives exactly what ``read_header`` gives on the whole file, errors included, on every
    pydicom test file, the bad-input corpus and instances cut short in their pixel data."""
    samples: list[tuple[str, bytes]] = [
        (name, Path(name).read_bytes()) for name in get_testdata_files("*")
        if Path(name).is_file()]
    samples += [(path.name, path.read_bytes()) for path in sorted(CORPUS.glob("*.dcm"))]
    for name in CUT_FILES:
        data = pydicom_file(name)
        end = header_end(scan(data), data)
        cuts = range(end + 12, len(data))  # inside the pixel data (none: no pixel data)
        samples += [(f"{name}[:{cut}]", data[:cut])
                    for cut in random.Random(name).sample(cuts, min(40, len(cuts)))]
    decided = refused = 0
    for name, data in samples:
        whole = scan(data)
        end = header_end(whole, data)
        for cut in sorted({HEAD_BYTES, end + 12, end + 13, len(data) - 1}):
            if not 0 < cut < len(data):
                continue
            early = scan_head(bytearray(data[:cut]))
            if early is None:
                continue
            head_only = outcome(
                lambda d, lim, e=early, c=cut: header_from_head(e, bytearray(d[:c]), len(d), lim),
                data)
            if head_only is None:
                continue
            decided += 1
            refused += isinstance(head_only, tuple)
            assert head_only == outcome(read_header, data), (name, cut)
    assert decided > 100 and refused > 10, (decided, refused)


@pytest.mark.parametrize("name", CUT_FILES)
def test_a_head_cut_before_the_pixel_data_gives_nothing(name: str) -> None:
    data = pydicom_file(name)
    whole = scan(data)
    end = header_end(whole, data)
    for cut in range(0, min(end + 12, len(data))):
        early = scan_head(bytearray(data[:cut]))
        # Only a cut past the pixel data element's tag can be read, and then it is the whole.
        assert early is None or (cut > end and early == whole), (name, cut)
    if whole is not None and whole.stop_offset < len(data):
        # The pixel data element's header in full (12 bytes at most) is enough.
        assert scan_head(bytearray(data[:end + 12])) == whole
