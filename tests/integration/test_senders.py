"""Real senders against ``triage-node serve``: every transfer syntax they produce is stored as sent.

Senders, as a PACS administrator would meet them:

* DCMTK ``storescu`` with files transcoded by ``dcmconv`` (explicit/implicit little endian,
  explicit big endian, deflated), ``dcmcjpeg`` (baseline, extended, lossless SV1, lossless
  process 14), ``dcmcjpls`` (lossless, near-lossless) and ``dcmcrle`` (RLE);
* a pynetdicom SCU sending JPEG 2000 and HTJ2K files (pydicom's own and ``tests/data/htj2k``)
  straight from disk, and eight associations at once;
* Orthanc forwarding a study with ``POST /modalities/{id}/store``.

For each instance the node's state database must hold one row with the negotiated transfer
syntax, and the spooled file's data set must be byte-for-byte the data set that was sent
(the receiver writes its own File Meta Information, nothing else). Each study must then be
processed without failure — which includes decoding it in the imaging stage — and the
decoded volume must match the uncompressed original (exactly, or closely for lossy syntaxes).
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from deploy.demo.node import SETTLED, NodeProcess, write_node_config
from deploy.demo.orthanc import LocalOrthanc
from deploy.demo.senders import dcmtk_env, storescu
from deploy.demo.studies import make_study
from triage_node.imaging.loader import load_series

pytestmark = pytest.mark.integration

GRID = (16, 64, 64)  # the hemorrhage detector takes series of at least 16 slices
SPACING = (4.0, 3.5, 3.5)
SCU_AET = "PYSCU"
HTJ2K_DIR = Path(__file__).resolve().parents[1] / "data" / "htj2k"
DCMTK_ENV = dcmtk_env()

DEFLATED = "1.2.840.10008.1.2.1.99"
STORESCU_PROFILE = """\
[[TransferSyntaxes]]
[Exact]
TransferSyntax1 = {syntax}
[[PresentationContexts]]
[Exact]
PresentationContext1 = CTImageStorage\\Exact
[[Profiles]]
[Exact]
PresentationContexts = Exact
"""

SENT: dict[str, str] = {}
"""Study Instance UID of every study sent in this module, by case name (checked at the end)."""


@dataclass(frozen=True)
class DcmtkCase:
    name: str
    tool: tuple[str, ...]
    syntax: str
    propose: str
    """storescu option that proposes the syntax (see ``storescu --help``), or ``config``:
    a ``--config-file`` profile proposing exactly ``syntax`` (storescu has no option for it)."""
    lossless: bool = True
    bits: int = 12
    """JPEG baseline takes 8-bit samples; the rest get unsigned 12-bit (DCMTK's JPEG-LS
    near-lossless refuses signed data, and the phantom is signed when its noise leaves
    [-1024, 3071] HU)."""


DCMTK_CASES = [
    DcmtkCase("explicit-little", ("dcmconv", "+te"), "1.2.840.10008.1.2.1", "-xe"),
    DcmtkCase("implicit-little", ("dcmconv", "+ti"), "1.2.840.10008.1.2", "-xi"),
    DcmtkCase("explicit-big", ("dcmconv", "+tb"), "1.2.840.10008.1.2.2", "-xb"),
    DcmtkCase("deflated", ("dcmconv", "+td"), "1.2.840.10008.1.2.1.99", "-xd"),
    DcmtkCase("jpeg-baseline", ("dcmcjpeg", "+eb"), "1.2.840.10008.1.2.4.50", "-xy",
              lossless=False, bits=8),
    DcmtkCase("jpeg-extended", ("dcmcjpeg", "+ee"), "1.2.840.10008.1.2.4.51", "-xx",
              lossless=False),
    DcmtkCase("jpeg-lossless-sv1", ("dcmcjpeg", "+e1"), "1.2.840.10008.1.2.4.70", "-xs"),
    # Process 14 with another predictor: no storescu option proposes it, a profile does.
    DcmtkCase("jpeg-lossless-p14", ("dcmcjpeg", "+el"), "1.2.840.10008.1.2.4.57", "config"),
    DcmtkCase("jpeg-ls-lossless", ("dcmcjpls", "+el"), "1.2.840.10008.1.2.4.80", "-xt"),
    DcmtkCase("jpeg-ls-near-lossless", ("dcmcjpls", "+en"), "1.2.840.10008.1.2.4.81", "-xu",
              lossless=False),
    DcmtkCase("rle", ("dcmcrle",), "1.2.840.10008.1.2.5", "-xr"),
]


@pytest.fixture(scope="module")
def sender_node(
    orthanc: LocalOrthanc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[NodeProcess]:
    folder = tmp_path_factory.mktemp("senders-node")
    config = write_node_config(
        folder,
        dicom__trusted_callers=[
            {"ae_title": "STORESCU"}, {"ae_title": orthanc.aet}, {"ae_title": SCU_AET},
        ],
        dicom__max_associations=8,
        dicom__min_free_disk_mb=1,
        assembly__series_quiet_seconds=1,
        assembly__study_quiet_seconds=1,
        delivery__retry_initial_seconds=0.5,
        delivery__retry_max_seconds=2,
    )
    proc = NodeProcess(folder / "data", orthanc, config=config).start()
    yield proc
    proc.stop()


def _rows(node: NodeProcess, study_uid: str) -> dict[str, sqlite3.Row]:
    """The node's ``instances`` rows of one study, by SOP Instance UID."""
    db = sqlite3.connect(f"file:{node.data_dir / 'state.sqlite3'}?mode=ro", uri=True,
                         timeout=30)
    db.row_factory = sqlite3.Row
    try:
        rows = db.execute(
            "SELECT sop_instance_uid, transfer_syntax, path FROM instances WHERE study_uid = ?",
            (study_uid,),
        ).fetchall()
    finally:
        db.close()
    return {str(r["sop_instance_uid"]): r for r in rows}


def _dataset_bytes(path: Path) -> bytes:
    """A Part 10 file's data set as encoded, i.e. what goes over the network after the meta."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM", f"{path.name} is not a Part 10 file"
    assert data[132:136] == b"\x02\x00\x00\x00", "File Meta Information Group Length first"
    meta_length = int.from_bytes(data[140:144], "little")
    return data[144 + meta_length :]


def _inflated(path: Path) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)  # raw deflate, PS3.5 A.5
    return inflater.decompress(_dataset_bytes(path)) + inflater.flush()


def _assert_stored_as_sent(node: NodeProcess, sent: list[Path], syntax: str) -> list[Path]:
    """Every sent file is one row with ``syntax`` and a spooled data set equal to the sent one."""
    study_uid = str(pydicom.dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID)
    rows = _rows(node, study_uid)
    assert len(rows) == len(sent)
    spooled: list[Path] = []
    for path in sent:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.file_meta.TransferSyntaxUID == syntax
        row = rows[str(ds.SOPInstanceUID)]
        assert row["transfer_syntax"] == syntax
        stored = node.data_dir / "spool" / str(row["path"])
        if syntax == DEFLATED:
            # storescu inflates the file and deflates again on the wire (and pads the
            # stream to an even length): the deflated bytes differ, their content may not.
            assert _inflated(stored) == _inflated(path), f"{path.name} was altered"
        else:
            assert _dataset_bytes(stored) == _dataset_bytes(path), f"{path.name} was altered"
        spooled.append(stored)
    return spooled


def _assert_decodes_like(spooled: list[Path], original: list[Path], lossless: bool) -> None:
    decoded = load_series(spooled)
    reference = load_series(original)
    assert decoded.shape == reference.shape
    assert decoded.spacing == pytest.approx(reference.spacing)
    if lossless:
        np.testing.assert_array_equal(decoded.array, reference.array)
    else:
        value_range = float(reference.array.max() - reference.array.min())
        error = float(np.abs(decoded.array - reference.array).mean()) / value_range
        assert error < 0.02  # JPEG baseline q90 on the noisy phantom: about 1 %
        assert np.corrcoef(decoded.array.ravel(), reference.array.ravel())[0, 1] > 0.98


def _unsigned(folder: Path, out: Path, bits: int) -> list[Path]:
    """The series with unsigned ``bits``-bit samples: HU + 1024 (12 bits, Rescale Slope 1)
    or (HU + 1024) / 16 (8 bits, Rescale Slope 16), clipped to the range."""
    out.mkdir()
    paths = []
    slope = 1 if bits == 12 else 16
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(
            ds.RescaleIntercept
        )
        stored = np.clip(np.round((hu + 1024.0) / slope), 0, 2**bits - 1)
        allocated = 8 if bits == 8 else 16
        ds.PixelData = stored.astype(np.uint8 if bits == 8 else np.uint16).tobytes()
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, bits, bits - 1
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, -1024
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(out / path.name, enforce_file_format=True)
        paths.append(out / path.name)
    return paths


@pytest.mark.parametrize("case", DCMTK_CASES, ids=lambda c: c.name)
def test_storescu_sends_each_dcmtk_transfer_syntax(
    case: DcmtkCase, sender_node: NodeProcess, tmp_path: Path
) -> None:
    seed = 7000 + DCMTK_CASES.index(case)
    study = make_study(case.name, tmp_path, seed=seed, bleed_ml=None, grid=GRID, spacing=SPACING)
    original = _unsigned(study.folder, tmp_path / "unsigned", case.bits)
    out = tmp_path / "send"
    out.mkdir()
    sent = []
    for path in original:
        target = out / path.name
        subprocess.run([*case.tool, str(path), str(target)], check=True, capture_output=True,
                       env=DCMTK_ENV, timeout=60)
        sent.append(target)

    if case.propose == "config":
        config = tmp_path / "storescu.cfg"
        config.write_text(STORESCU_PROFILE.format(syntax=case.syntax))
        propose = ["-xf", str(config), "Exact"]
    else:
        # -R: propose only the SOP classes of the files, with the syntaxes the option names.
        propose = [case.propose, "-R"]
    storescu(out, sender_node.dicom_port, extra=propose)

    spooled = _assert_stored_as_sent(sender_node, sent, case.syntax)
    _assert_decodes_like(spooled, original, case.lossless)
    SENT[case.name] = study.study_instance_uid


def _fresh_copy(source: Path, out: Path) -> Path:
    """``source`` with new Study/Series/SOP Instance UIDs (pixel data untouched), so that
    pydicom's test files, which share UIDs between variants, arrive as distinct studies."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target = out / source.name
    ds.save_as(target, enforce_file_format=True)
    return target


def _testfile(name: str) -> Path:
    local = HTJ2K_DIR / name
    if local.exists():
        return local
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom test file {name} is not installed"
    return Path(str(path))


J2K_FILES = [
    ("MR_small_jp2klossless.dcm", "MR_small.dcm", True),
    ("MR2_J2KI.dcm", "MR2_UNCI.dcm", False),
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm", True),
    ("MR_small_htj2k_lossless.dcm", "MR_small.dcm", True),
    ("MR_small_htj2k_lossless_rpcl.dcm", "MR_small.dcm", True),
    ("MR_small_htj2k_lossy.dcm", "MR_small.dcm", False),
]


@pytest.mark.parametrize(("name", "reference", "lossless"), J2K_FILES,
                         ids=[f[0] for f in J2K_FILES])
def test_pynetdicom_sends_jpeg2000_and_htj2k(
    name: str, reference: str, lossless: bool, sender_node: NodeProcess, tmp_path: Path
) -> None:
    path = _fresh_copy(_testfile(name), tmp_path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    syntax = str(ds.file_meta.TransferSyntaxUID)

    ae = AE(ae_title=SCU_AET)
    ae.add_requested_context(ds.SOPClassUID, [syntax])
    assoc = ae.associate("127.0.0.1", sender_node.dicom_port, ae_title="TRIAGE")
    assert assoc.is_established
    accepted = [c for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID]
    assert [c.transfer_syntax[0] for c in accepted] == [syntax]
    # A path is sent as its encoded data set: what is on disk is what goes on the wire.
    status = assoc.send_c_store(path)
    assoc.release()
    assert status.Status == 0x0000

    [spooled] = _assert_stored_as_sent(sender_node, [path], syntax)
    decoded = load_series([spooled]).array
    expected = load_series([_testfile(reference)]).array
    if lossless:
        np.testing.assert_array_equal(decoded, expected)
    else:
        value_range = float(expected.max() - expected.min())
        assert float(np.abs(decoded - expected).mean()) / value_range < 0.01
    SENT[name] = str(ds.StudyInstanceUID)


def test_eight_simultaneous_associations_are_all_recorded_once(
    sender_node: NodeProcess, tmp_path: Path
) -> None:
    study = make_study("parallel", tmp_path, seed=7100, bleed_ml=None,
                       grid=(40, 64, 64), spacing=SPACING)
    paths = sorted(study.folder.glob("*.dcm"))
    sop_class = pydicom.dcmread(paths[0], stop_before_pixels=True).SOPClassUID
    statuses: list[tuple[str, int]] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def send(share: list[Path]) -> None:
        ae = AE(ae_title=SCU_AET)
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian])
        start.wait(timeout=30)  # all eight associate together
        assoc = ae.associate("127.0.0.1", sender_node.dicom_port, ae_title="TRIAGE")
        if not assoc.is_established:
            with lock:
                errors.append("association not established")
            return
        try:
            for path in share:
                status = assoc.send_c_store(path)
                with lock:
                    statuses.append((path.name, int(status.Status) if status else -1))
        finally:
            assoc.release()

    threads = [threading.Thread(target=send, args=(paths[k::8],)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert sorted(statuses) == sorted((p.name, 0) for p in paths)

    spooled = _assert_stored_as_sent(sender_node, paths, ExplicitVRLittleEndian)
    assert len(set(spooled)) == len(paths)
    study_dirs = {p.parent for p in spooled}
    on_disk = [f for d in study_dirs for f in d.rglob("*.dcm")]
    assert len(on_disk) == len(paths)  # no second copy of any instance
    SENT["parallel"] = study.study_instance_uid


def test_orthanc_forwards_a_study(
    orthanc: LocalOrthanc, sender_node: NodeProcess, tmp_path: Path
) -> None:
    study = make_study("forwarded", tmp_path, seed=7200, bleed_ml=None, grid=GRID,
                       spacing=SPACING)
    compressed = tmp_path / "jpls"
    compressed.mkdir()
    for path in sorted(study.folder.glob("*.dcm")):
        subprocess.run(["dcmcjpls", "+el", str(path), str(compressed / path.name)],
                       check=True, capture_output=True, env=DCMTK_ENV, timeout=60)
    storescu(compressed, orthanc.dicom_port, called_aet=orthanc.aet, extra=["-xt", "-R"])

    with orthanc.client() as client:
        found = client.post("/tools/lookup", content=study.study_instance_uid)
        found.raise_for_status()
        [orthanc_study] = [r["ID"] for r in found.json() if r["Type"] == "Study"]
        modality = {"AET": "TRIAGE", "Host": "127.0.0.1", "Port": sender_node.dicom_port}
        client.put("/modalities/triage-senders", json=modality).raise_for_status()
        moved = client.post("/modalities/triage-senders/store",
                            json={"Resources": [orthanc_study], "Synchronous": True},
                            timeout=120)
        assert moved.status_code == 200, moved.text
        instances: list[dict[str, Any]] = client.get(
            f"/studies/{orthanc_study}/instances"
        ).json()
        sent = []
        for instance in instances:
            path = tmp_path / f"orthanc-{instance['ID']}.dcm"
            path.write_bytes(client.get(f"/instances/{instance['ID']}/file").content)
            sent.append(path)
    assert len(sent) == study.instances

    spooled = _assert_stored_as_sent(sender_node, sent, "1.2.840.10008.1.2.4.80")
    _assert_decodes_like(spooled, sorted(study.folder.glob("*.dcm")), lossless=True)
    SENT["orthanc"] = study.study_instance_uid


def test_every_sent_study_was_processed(sender_node: NodeProcess) -> None:
    """Routing, imaging (decoding every syntax) and detectors ran for each study to the end."""
    assert SENT, "no sender test ran before this one"
    failed = {}
    for name, uid in SENT.items():
        item = sender_node.wait_for_study(uid, statuses=SETTLED, timeout=300)
        if item["status"] == "failed":
            failed[name] = item
    assert failed == {}
    for name in SENT:
        if name.endswith(".dcm"):
            continue
        # The CT studies are head CTs: the hemorrhage detector ran and delivered.
        item = next(i for i in sender_node.worklist()
                    if i["study_instance_uid"] == SENT[name])
        assert item["status"] == "delivered", (name, item)
