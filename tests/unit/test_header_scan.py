"""The receive path's fast header reader gives what pydicom's path gives, or steps aside.

``read_header`` tries :func:`triage_node.spool.header_scan.scan` first and falls back to
``read_header_with_pydicom``. These tests run both on every file of pydicom's test data, the
bad-input corpus, and thousands of truncations and byte corruptions of real files, and require
the same outcome: the same :class:`InstanceHeader`, or the same error with the same message.
"""

from __future__ import annotations

import random
import warnings
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, CTImageStorage, ImplicitVRLittleEndian, generate_uid
from pydicom.values import convert_value

from trainers.phantoms.dicom import write_ct_series
from triage_node.config.models import LimitsConfig
from triage_node.spool import header_scan
from triage_node.spool.header_scan import TEXT_VRS, ScannedHeader, raw_text, scan, scan_next
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


def _through_layout(data: bytes) -> tuple[ScannedHeader | None, bool]:
    """``scan_next`` of ``data``, and whether it was read through the last head's layout."""
    before = getattr(header_scan._SAME_LAYOUT, "layout", None)
    result = scan_next(data)
    return result, before is not None and header_scan._SAME_LAYOUT.layout is before


def _same_as_full_scan(data: bytes, label: str) -> bool:
    expected = scan(data)
    got, through_layout = _through_layout(data)
    assert got == expected, label
    if got is not None and expected is not None:  # the same order too (JSON in the index)
        assert list(got.attributes) == list(expected.attributes), label
    return through_layout


def _saved(ds: Dataset) -> bytes:
    """``ds`` as a Part 10 file."""
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _with_sop_uid(path: Path, uid: str) -> bytes:
    """The file at ``path`` with ``uid`` as its SOP Instance UID (dataset and file meta)."""
    ds = dcmread(path)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    return _saved(ds)


def test_a_series_read_head_after_head_reads_as_each_head_alone(tmp_path: Path) -> None:
    """The receiver reads an association's heads through the last one's layout when only
    values differ (``scan_next``): for a series as a scanner writes it (new UIDs, instance
    numbers, positions), every head after the first takes that path, and gives exactly what
    a full scan of it gives. A UID of another (padded) length moves every element after it:
    that head is read through the layout too, the rest of it that many bytes further on."""
    rng = np.random.default_rng(3)
    hu = rng.normal(0, 50, size=(12, 64, 64)).astype(np.float32)
    files = write_ct_series(hu, (1.0, 0.7, 0.7), tmp_path, patient_name="SCAN^NEXT",
                            patient_id="NEXT1", accession_number="ACC2",
                            study_description="CT", series_description="Axial",
                            body_part_examined="CHEST")
    # generate_uid() gives 62 characters or fewer about once in a hundred, so the UIDs are
    # set here: all of one padded length, then one shorter (in the file meta and the data
    # set: two values of another length).
    root = "1.2.826.0.1.3680043.8.498."
    same = [_with_sop_uid(path, f"{root}{10**37 + i}") for i, path in enumerate(files)]
    header_scan._SAME_LAYOUT.layout = None
    through = [_same_as_full_scan(data[:HEAD_BYTES], f"#{i}") for i, data in enumerate(same)]
    assert through == [False] + [True] * (len(files) - 1)

    shorter = [data if i != 7 else _with_sop_uid(files[i], f"{root}{10**35 + i}")
               for i, data in enumerate(same)]
    header_scan._SAME_LAYOUT.layout = None
    through = [_same_as_full_scan(data[:HEAD_BYTES], f"#{i}") for i, data in enumerate(shorter)]
    assert through == [False] + [True] * (len(files) - 1)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm",
                                  "SC_rgb_rle.dcm", "MR_small.dcm"])
def test_changed_bytes_read_through_the_layout_as_a_full_scan_reads_them(name: str) -> None:
    """Bytes changed anywhere before the pixel data, after a head of that layout: values
    (text, numbers, the character set, private creators, Pixel Representation), lengths,
    VRs, tags, sequence items. Whatever the path, the result is the full scan's."""
    data = pydicom_file(name)
    base = scan(data)
    assert base is not None and base.stop_offset < len(data)
    limit = base.stop_offset + 4
    rng = random.Random(name)
    through = 0
    for trial in range(800):
        header_scan._SAME_LAYOUT.layout = None
        scan_next(data)  # the previous head: the unchanged file
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(0, limit)
            mutated[at] = rng.choice([0x00, 0x20, 0x30, 0x39, 0x2E, 0x5C, rng.randrange(256)])
        through += _same_as_full_scan(bytes(mutated), f"{name} trial {trial}")
    assert through > 100, through  # most changes fall inside values


def _new_value(vr: str, rng: random.Random) -> str:
    """A valid value of ``vr`` of a random length."""
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 12)))
    if vr == "IS":
        return str(int(digits) * rng.choice([1, -1]))
    if vr == "DS":
        number = int(digits[:8]) / 10 ** rng.randint(0, 6) * rng.choice([1, -1])
        return f"{number:.{rng.randint(0, 5)}f}"
    if vr == "UI":
        return "1.2." + str(int(digits))
    if vr == "TM":
        return "123045.123456"[:rng.choice([2, 4, 6, 8, 10, 13])]
    letters = "".join(rng.choice("ABCDEFGHIJ_ 0123") for _ in range(rng.randint(1, 16)))
    return letters.strip() or "A"


_NEW_VALUE_VRS = frozenset({"IS", "DS", "UI", "TM", "CS", "LO", "SH"})


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "JPEG2000.dcm",
                                  "MR_small.dcm"])
def test_values_of_another_length_read_through_the_layout_as_a_full_scan_reads_them(
        name: str) -> None:
    """Values given another length (text of the data set, the SOP Instance UID of the file
    meta): the head is read through the layout, the bytes after each such value that many
    further on, and gives what a full scan gives."""
    base_ds = dcmread(BytesIO(pydicom_file(name)))
    base = _saved(base_ds)
    candidates = [e.tag for e in base_ds if e.VR in _NEW_VALUE_VRS and e.tag != 0x00080005
                  and e.value not in (None, "")]
    assert candidates, name
    rng = random.Random(name)
    through = 0
    trials = 150
    for trial in range(trials):
        ds = dcmread(BytesIO(pydicom_file(name)))
        for tag in rng.sample(candidates, min(len(candidates), rng.randint(1, 6))):
            ds[tag].value = _new_value(ds[tag].VR, rng)
        if rng.random() < 0.5:
            ds.file_meta.MediaStorageSOPInstanceUID = UID(
                "1.2." + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40))))
        header_scan._SAME_LAYOUT.layout = None
        scan_next(base)  # the previous head: the file as it was
        through += _same_as_full_scan(_saved(ds), f"{name} trial {trial}")
    assert through > trials // 2, through  # most are read through the layout


def test_a_length_that_reads_as_a_vr_is_left_to_the_full_scan() -> None:
    """An implicit VR data set whose first element's length reads as a VR ("DS": 21,316
    bytes) is left to pydicom by the full scan (explicit VR under an implicit syntax?); read
    through the layout of the same file with a short value, it must be too."""
    ds = dcmread(BytesIO(pydicom_file("MR_small_implicit.dcm")))
    base = _saved(ds)
    ds.ImageType = ["DERIVED", "X" * (0x5344 - len("DERIVED\\"))]
    odd = _saved(ds)
    at = odd.find(b"\x08\x00\x08\x00")
    assert odd[at + 4:at + 6] == b"DS", odd[at:at + 8]
    header_scan._SAME_LAYOUT.layout = None
    scan_next(base)
    assert scan(odd) is None
    assert not _same_as_full_scan(odd, "length DS")


def test_a_changed_character_set_is_read_in_full(tmp_path: Path) -> None:
    """The same bytes under another Specific Character Set of the same length read as
    that character set says, not as the last head's did."""
    hu = np.zeros((1, 16, 16), dtype=np.float32)
    [path] = write_ct_series(hu, (1.0, 1.0, 1.0), tmp_path, patient_name="M\u00fcller^J\u00f6rg",
                             patient_id="CS1", accession_number="ACC3", study_description="CT",
                             series_description="Axial", body_part_examined="HEAD")
    utf8 = path.read_bytes()[:HEAD_BYTES]
    at = utf8.find(b"ISO_IR 192")
    assert at > 0, "the series is written in UTF-8"
    latin = utf8[:at] + b"ISO_IR 100" + utf8[at + 10:]
    header_scan._SAME_LAYOUT.layout = None
    assert not _same_as_full_scan(utf8, "utf-8")
    assert not _same_as_full_scan(latin, "latin-1")  # a differing character set: in full
    as_utf8, as_latin = scan(utf8), scan(latin)
    assert as_utf8 is not None and as_latin is not None
    assert as_utf8.attributes["PatientName"] == "M\u00fcller^J\u00f6rg"
    assert as_latin.attributes["PatientName"] == "M\u00c3\u00bcller^J\u00c3\u00b6rg"


def _implicit_file(private: bool = False, **elements: object) -> bytes:
    """A small implicit VR little endian CT instance with ``elements`` added (and a private
    block of a creator pydicom's private dictionary knows)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 2
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 16, 16, 15
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if private:
        ds.add_new(0x00090010, "LO", "GEMS_IDEN_01")
        ds.add_new(0x00091001, "LO", "FULL")  # LO "Full fidelity" in that dictionary
    ds.PixelData = bytes(8)
    out = BytesIO()
    ds.save_as(out, implicit_vr=True, little_endian=True, enforce_file_format=True)
    return out.getvalue()


def test_a_changed_pixel_representation_is_read_in_full() -> None:
    """Smallest Image Pixel Value is US or SS by Pixel Representation: the same two bytes
    read 65535 under one and -1 under the other, not as the last head said."""
    unsigned = _implicit_file(PixelRepresentation=0, SmallestImagePixelValue=65535)
    at = unsigned.index(b"\x28\x00\x03\x01\x02\x00\x00\x00") + 8
    signed = unsigned[:at] + b"\x01\x00" + unsigned[at + 2:]
    header_scan._SAME_LAYOUT.layout = None
    assert not _same_as_full_scan(unsigned, "unsigned")
    assert not _same_as_full_scan(signed, "signed")
    as_signed = scan(signed)
    assert as_signed is not None and as_signed.attributes["SmallestImagePixelValue"] == "-1"


def test_a_changed_private_creator_is_read_in_full() -> None:
    """In an implicit VR data set a private element's VR comes from its creator's
    dictionary: under another creator of the same length the same bytes are unknown (UN,
    not indexed), not the last head's LO."""
    ours = _implicit_file(private=True)
    other = ours.replace(b"GEMS_IDEN_01", b"XEMS_IDEN_01")
    header_scan._SAME_LAYOUT.layout = None
    assert not _same_as_full_scan(ours, "GEMS")
    assert not _same_as_full_scan(other, "another creator")
    read, unknown = scan(ours), scan(other)
    assert read is not None and unknown is not None
    assert read.attributes["(0009,1001)"] == "FULL" and "(0009,1001)" not in unknown.attributes
