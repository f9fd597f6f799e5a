"""Cheap checks that decide whether a received instance is usable, before it is spooled.

Called from :func:`triage_node.spool.index.read_header` for every instance (C-STORE and
STOW-RS alike), right after the header was read (by :mod:`triage_node.spool.header_scan`, or
by pydicom with ``stop_before_pixels``). The
checks look at the bytes and a handful of header attributes only; pixel data is never copied
or decoded, so they cost microseconds on the receive hot path.

- The header must be complete: a data set cut short before its pixel data cannot be
  understood (:class:`InvalidDicomError`, C-STORE ``0xC210``); nothing is kept.
- Everything else that parses but cannot be processed raises :class:`UnusableDicomError`: the
  instance is kept in quarantine with the reason and the sender is told Success (PS3.4 B.2.3:
  the SCP has taken responsibility for it). That covers pixel data cut short, a Pixel Data
  length that does not match the geometry (native transfer syntaxes, PS3.5 8.1.1 and 8.4:
  odd lengths are padded by one byte), absurd or unsupported image geometry, and a file meta
  without Transfer Syntax UID (PS3.10 7.1).

Character sets are not checked here on purpose: the attributes the node needs to index an
instance (UIDs, Modality) are ASCII whatever Specific Character Set says, and pydicom decodes
other text with replacement characters, so an unknown or violated character set does not make
an instance unusable (PS3.5 6.1.2.3 leaves unknown repertoires to the receiver).
"""

from __future__ import annotations

import mmap
import struct
import threading
from typing import Any, Protocol

from pydicom.dataset import FileDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from triage_node.config.models import LimitsConfig
from triage_node.errors import InvalidDicomError, UnusableDicomError

_PIXEL_TAGS = {
    (0x7FE0, 0x0010): "PixelData",
    (0x7FE0, 0x0008): "FloatPixelData",
    (0x7FE0, 0x0009): "DoubleFloatPixelData",
}
_BYTES_PER_FLOAT_SAMPLE = {"FloatPixelData": 4, "DoubleFloatPixelData": 8}
_LONG_LENGTH_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC",
                              b"UN", b"UR", b"UT", b"UV"})
_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2"})
_SUPPORTED_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})
_UNDEFINED = 0xFFFFFFFF

_lock = threading.Lock()

Received = bytes | mmap.mmap
"""The received bytes: in memory (STOW-RS) or mapped from the spooled file (C-STORE)."""
Head = bytes | bytearray | mmap.mmap
"""The received bytes, or only their first part (the head a receiver reads early)."""

_limits = LimitsConfig()


def configure(limits: LimitsConfig) -> None:
    """Set the limits the receiver applies (once, at start, from ``node.yaml``'s ``limits``)."""
    global _limits
    with _lock:
        _limits = limits


def current_limits() -> LimitsConfig:
    return _limits


class _Attributes(Protocol):
    """What the geometry checks read: a parsed ``Dataset``, or the scanned attributes."""

    def get(self, key: str, default: Any = None, /) -> Any: ...


def _int(ds: _Attributes, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, default)
        if value is None or value == "":
            return default
        return int(value)
    except (TypeError, ValueError) as exc:
        raise UnusableDicomError(f"{keyword} is not an integer") from exc


def _check_header_complete(ds: FileDataset, data: Received) -> None:
    """The element read last must end where the bytes end (when there is no pixel data)."""
    tags = ds.keys()
    if not tags:
        raise InvalidDicomError("the data set is empty")
    last = ds.get_item(max(tags))
    value_tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if value_tell is None or length is None or length == _UNDEFINED:
        return  # already converted, or a sequence pydicom delimited itself
    end = value_tell + length
    # Cut inside the value; or 1-7 bytes of a next element header (pydicom stops quietly).
    # Trailing NUL padding, which some writers add, is not a truncation.
    if end > len(data) or (0 < len(data) - end < 8 and data[end:].strip(b"\0")):
        raise InvalidDicomError(
            f"the data set is truncated: it ends inside or after element "
            f"({last.tag.group:04X},{last.tag.element:04X})")


def _pixel_element(data: Head, at: int, implicit: bool,
                   little: bool) -> tuple[str, int, int]:
    """(keyword, value length, value offset) of the pixel data element starting at ``at``."""
    e = "<" if little else ">"
    if len(data) < at + 8:
        raise UnusableDicomError("pixel data truncated: the element header is incomplete")
    group, element = struct.unpack_from(e + "HH", data, at)
    keyword = _PIXEL_TAGS.get((group, element))
    if keyword is None:  # pydicom stopped elsewhere: nothing we know how to check
        raise InvalidDicomError(f"unexpected element ({group:04X},{element:04X}) at the "
                                "start of the pixel data")
    if implicit:
        return keyword, struct.unpack_from(e + "L", data, at + 4)[0], at + 8
    if bytes(data[at + 4:at + 6]) in _LONG_LENGTH_VRS:
        if len(data) < at + 12:
            raise UnusableDicomError("pixel data truncated: the element header is incomplete")
        return keyword, struct.unpack_from(e + "L", data, at + 8)[0], at + 12
    return keyword, struct.unpack_from(e + "H", data, at + 6)[0], at + 8


def _check_encapsulated(data: Head, offset: int) -> None:
    """Walk the fragment items (PS3.5 A.4) to the sequence delimiter; O(frames), no copying."""
    end = len(data)
    while True:
        if offset + 8 > end:
            raise UnusableDicomError("pixel data truncated: the fragment sequence has no "
                                     "delimiter")
        group, element, length = struct.unpack_from("<HHL", data, offset)
        if (group, element) == (0xFFFE, 0xE0DD):
            return
        if (group, element) != (0xFFFE, 0xE000) or length == _UNDEFINED:
            raise UnusableDicomError("encapsulated pixel data is malformed: expected an item "
                                     "or the sequence delimiter")
        offset += 8 + length
        if offset > end:
            raise UnusableDicomError("pixel data truncated: a fragment is cut short")


def _check_geometry(ds: _Attributes, keyword: str, limits: LimitsConfig) -> int:
    """Validate the image pixel module; return the expected native byte count."""
    rows = _int(ds, "Rows")
    columns = _int(ds, "Columns")
    if rows is None or columns is None:
        raise UnusableDicomError(f"{keyword} present without Rows and Columns")
    if rows <= 0 or columns <= 0:
        raise UnusableDicomError(f"image has no pixels: Rows={rows}, Columns={columns}")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames < 1:
        raise UnusableDicomError(f"NumberOfFrames is {frames}")
    samples = _int(ds, "SamplesPerPixel", 1) or 1
    if samples not in (1, 3, 4):
        raise UnusableDicomError(f"SamplesPerPixel {samples} is not supported (1, 3 or 4)")
    total = rows * columns * frames * samples
    if total > limits.max_pixels_per_instance:
        raise UnusableDicomError(
            f"image too large: Rows x Columns x frames x samples = {rows}x{columns}x{frames}"
            f"x{samples} exceeds limits.max_pixels_per_instance "
            f"({limits.max_pixels_per_instance})")
    if keyword in _BYTES_PER_FLOAT_SAMPLE:
        return total * _BYTES_PER_FLOAT_SAMPLE[keyword]
    bits = _int(ds, "BitsAllocated")
    if bits is None:
        raise UnusableDicomError("PixelData present without BitsAllocated")
    if bits not in _SUPPORTED_BITS_ALLOCATED:
        raise UnusableDicomError(f"BitsAllocated {bits} is not supported (1, 8, 16, 32 or 64)")
    stored = _int(ds, "BitsStored")
    if stored is not None and not 1 <= stored <= bits:
        raise UnusableDicomError(f"BitsStored {stored} is not within 1..BitsAllocated ({bits})")
    return (total + 7) // 8 if bits == 1 else total * (bits // 8)


def check_received(ds: FileDataset, data: Received, stop_offset: int,
                   limits: LimitsConfig | None = None) -> None:
    """Decide whether the parsed instance ``ds`` (read from ``data``) can be used.

    ``stop_offset`` is where pydicom stopped reading (``stop_before_pixels``): the start of
    the pixel data element, or the end of the bytes when there is none. Raises
    :class:`InvalidDicomError` when the header is incomplete, :class:`UnusableDicomError`
    (the message names the attribute) when the instance must be quarantined.
    """
    limits = limits or _limits
    meta = getattr(ds, "file_meta", None)
    syntax = str(meta.get("TransferSyntaxUID", "") or "") if meta is not None else ""
    if not syntax:
        raise UnusableDicomError("file meta has no TransferSyntaxUID (0002,0010): the "
                                 "encoding of the data set is unknown")
    if syntax == DeflatedExplicitVRLittleEndian:
        # pydicom read an inflated copy: offsets do not refer to ``data`` and the pixel data
        # was not reached; check the geometry of anything that declares one.
        if "Rows" in ds:
            _check_geometry(ds, "PixelData", limits)
        return
    if stop_offset >= len(data):
        _check_header_complete(ds, data)
        return
    implicit, little = ds.original_encoding
    _check_pixel_data(ds, data, stop_offset, syntax, bool(implicit), bool(little), limits)


def check_scanned(attributes: dict[str, Any], data: Received, stop_offset: int, syntax: str,
                  implicit: bool, limits: LimitsConfig | None = None) -> None:
    """:func:`check_received` for a header read by :mod:`triage_node.spool.header_scan`
    (little endian, not deflated, the data set complete up to ``stop_offset``)."""
    if stop_offset < len(data):
        _check_pixel_data(attributes, data, stop_offset, syntax, implicit, True,
                          limits or _limits)


def check_scanned_head(attributes: dict[str, Any], head: Head, size: int,
                       stop_offset: int, syntax: str, implicit: bool,
                       limits: LimitsConfig | None = None) -> bool:
    """:func:`check_scanned` from the first bytes of an instance and its size alone, when
    that is enough: the pixel data element's header lies in ``head`` and declares a length
    (nothing past it is read then, only the size counts). Returns False, having checked
    nothing, when the whole instance is needed (encapsulated fragments to walk)."""
    if stop_offset + 12 > len(head) or stop_offset >= size:
        return False
    if _pixel_element(head, stop_offset, implicit, True)[1] == _UNDEFINED:
        return False
    _check_pixel_data(attributes, head, stop_offset, syntax, implicit, True, limits or _limits,
                      size)
    return True


def _check_pixel_data(ds: _Attributes, data: Head, stop_offset: int, syntax: str,
                      implicit: bool, little: bool, limits: LimitsConfig,
                      size: int | None = None) -> None:
    """``size``: the instance's size when ``data`` holds only its first bytes (as far as the
    pixel data element's header, at least, and its length is defined)."""
    keyword, length, value_at = _pixel_element(data, stop_offset, implicit, little)
    if length == _UNDEFINED:
        _check_geometry(ds, keyword, limits)
        _check_encapsulated(data, value_at)
        return
    present = (len(data) if size is None else size) - value_at
    if length > present:
        raise UnusableDicomError(
            f"pixel data truncated: {present} of {length} bytes present")
    expected = _check_geometry(ds, keyword, limits)
    if syntax not in _NATIVE_SYNTAXES:
        return  # encapsulated (or private) syntax with a defined length: nothing to compare
    if length != expected and not (expected % 2 == 1 and length == expected + 1):
        raise UnusableDicomError(
            f"{keyword} length {length} does not match Rows x Columns x frames x samples x "
            f"BitsAllocated/8 = {expected} bytes")
