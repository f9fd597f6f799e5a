"""Receive-time validation (``triage_node.receive.validate``) through ``read_header``."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from triage_node.config.models import LimitsConfig
from triage_node.errors import InvalidDicomError, UnusableDicomError
from triage_node.receive import validate
from triage_node.spool.index import read_header

CORPUS = Path(__file__).resolve().parents[2] / "fixtures" / "bad-input"
MANIFEST: dict[str, Any] = json.loads((CORPUS / "manifest.json").read_text())
CORPUS_LIMITS = LimitsConfig(**MANIFEST["config"]["limits"])


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_corpus = _load_generator()


@pytest.fixture
def restore_limits() -> Iterator[None]:
    before = validate.current_limits()
    yield
    validate.configure(before)


def test_the_committed_corpus_is_what_the_script_generates(tmp_path: Path) -> None:
    written = make_corpus.build(tmp_path)
    assert {p.name for p in written} == {f["file"] for f in MANIFEST["files"]}
    for path in written:
        assert path.read_bytes() == (CORPUS / path.name).read_bytes(), path.name


@pytest.mark.parametrize("entry", MANIFEST["files"], ids=[f["file"] for f in MANIFEST["files"]])
def test_read_header_decides_as_the_manifest_says(entry: dict[str, Any]) -> None:
    data = (CORPUS / entry["file"]).read_bytes()
    if entry["ends_in"] == "spool":
        header = read_header(data, CORPUS_LIMITS)
        assert header.sop_instance_uid and header.study_uid
    elif entry["ends_in"] == "quarantine":
        with pytest.raises(UnusableDicomError, match=entry["reason_contains"]):
            read_header(data, CORPUS_LIMITS)
    else:
        with pytest.raises(InvalidDicomError) as caught:
            read_header(data, CORPUS_LIMITS)
        assert not isinstance(caught.value, UnusableDicomError)


def test_the_pixel_limit_comes_from_the_configuration(restore_limits: None) -> None:
    data = (CORPUS / "over-pixel-limit.dcm").read_bytes()
    assert read_header(data).sop_instance_uid  # default limit: a 128x128 image is fine
    validate.configure(CORPUS_LIMITS)
    with pytest.raises(UnusableDicomError, match="max_pixels_per_instance"):
        read_header(data)
    assert read_header(data, LimitsConfig(max_pixels_per_instance=128 * 128)).modality == "CT"


def _ct(**changes: Any) -> Dataset:
    ds: Dataset = make_corpus.base_ct("unit", **changes)
    return ds


def test_one_bit_pixels_are_counted_in_bits() -> None:
    ds = _ct(bits=8)
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelData = b"\x55" * (16 * 16 // 8)
    read_header(make_corpus.encode(ds))
    ds.PixelData = b"\x55" * (16 * 16 // 8 + 2)
    with pytest.raises(UnusableDicomError, match="does not match"):
        read_header(make_corpus.encode(ds))


def test_bits_stored_above_bits_allocated_is_unusable() -> None:
    ds = _ct()
    ds.BitsStored = 17
    with pytest.raises(UnusableDicomError, match="BitsStored 17"):
        read_header(make_corpus.encode(ds))


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRBigEndian],
                         ids=["implicit-le", "explicit-be"])
def test_pixel_checks_follow_the_transfer_syntax(syntax: Any) -> None:
    ds = _ct()
    good = make_corpus.encode(ds, syntax)
    assert read_header(good).transfer_syntax == syntax
    with pytest.raises(UnusableDicomError, match="pixel data truncated: 412 of 512"):
        read_header(good[:-100])
    ds.PixelData = ds.PixelData[:-2]
    with pytest.raises(UnusableDicomError, match="510 does not match"):
        read_header(make_corpus.encode(ds, syntax))


def test_encapsulated_pixel_data_is_walked_to_its_delimiter() -> None:
    ds = _ct(bits=8)
    ds.PixelData = encapsulate([b"\xff\xd8fake jpeg frame\xff\xd9"])
    ds["PixelData"].VR = "OB"
    data = make_corpus.encode(ds, JPEGBaseline8Bit)
    assert read_header(data).transfer_syntax == JPEGBaseline8Bit
    with pytest.raises(UnusableDicomError, match="truncated"):
        read_header(data[:-8])  # the sequence delimiter is gone
    with pytest.raises(UnusableDicomError, match="truncated"):
        read_header(data[:-14])  # and the fragment is cut


def test_deflated_data_sets_get_the_geometry_checks() -> None:
    ds = _ct()
    assert read_header(make_corpus.encode(ds, DeflatedExplicitVRLittleEndian)).study_uid
    ds.Rows = 0
    with pytest.raises(UnusableDicomError, match="no pixels"):
        read_header(make_corpus.encode(ds, DeflatedExplicitVRLittleEndian))


def test_a_cut_inside_an_element_header_is_not_understood() -> None:
    report = (CORPUS / "basic-text-sr.dcm").read_bytes()
    read_header(report)
    with pytest.raises(InvalidDicomError, match="truncated"):
        read_header(report + b"\x08\x00\x30")  # three bytes of a next tag
    with pytest.raises(InvalidDicomError, match="truncated"):
        read_header(report[:-3])
    assert read_header(report + b"\0" * 4).sop_class_uid  # NUL padding is not a cut


def test_non_integer_geometry_is_unusable() -> None:
    ds = _ct()
    ds.NumberOfFrames = 2
    data = make_corpus.encode(ds)
    tag = b"\x28\x00\x08\x00IS\x02\x002 "
    assert data.count(tag) == 1
    with pytest.raises(UnusableDicomError, match="NumberOfFrames"):
        read_header(data.replace(tag, tag[:-2] + b"xx"))
