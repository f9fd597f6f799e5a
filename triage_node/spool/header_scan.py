"""The receive path's header reader: the common case read straight from the bytes.

Every received instance is read once, header only, before it is acknowledged. pydicom builds a
``Dataset`` of element objects to do that, which costs more CPU than the rest of the receive
path together for a typical 50-element CT header. Most instances are simple, though: a Part 10
file whose data set is little endian (implicit VR, explicit VR, or an encapsulated syntax), whose
text is ASCII, Latin-1 or UTF-8, and whose elements are all well formed. :func:`scan` reads those
with ``struct`` alone, walking the top-level elements up to the pixel data (sequences are
skipped, item by item, never decoded) and converting the values the index keeps exactly as
:func:`triage_node.spool.index.header_attributes` would.

Anything else — big endian, deflate, no preamble, an unknown transfer syntax or VR, a value
``struct`` cannot take as pydicom would, a private element whose VR only pydicom's private
dictionary knows, a truncated or oddly padded data set — returns ``None``, and the caller reads
the instance with pydicom as before. So the fast path never decides anything on its own: it
either gives the result pydicom's path gives, or steps aside. ``tests/unit/test_header_scan.py``
checks that on every file of pydicom's test data, the bad-input corpus and thousands of
truncations and corruptions of real files.
"""

from __future__ import annotations

import re
import struct
import threading
from bisect import bisect_right
from dataclasses import dataclass
from functools import lru_cache

from pydicom.datadict import (
    dictionary_has_tag,
    dictionary_keyword,
    dictionary_VR,
    private_dictionary_VR,
)
from pydicom.uid import (
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from triage_node.receive.validate import Received

BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
MAX_VALUE_CHARS = 1024
TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST",
                      "TM", "UC", "UI", "UR", "UT"})
CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
"""VRs whose bytes follow Specific Character Set; the other text VRs are ASCII."""
SINGLE_VALUED_VRS = frozenset({"LT", "ST", "UT", "UR"})
STRIPPED_BOTH_ENDS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
NUMERIC_VRS = {"US": "H", "SS": "h", "UL": "L", "SL": "l", "FL": "f", "FD": "d",
               "UV": "Q", "SV": "q"}
FAST_CHARSETS = {"": "ascii", "ISO_IR 6": "ascii", "ISO_IR 100": "latin-1",
                 "ISO_IR 192": "utf-8"}
"""Character sets decoded directly from the raw bytes; any other goes through pydicom."""

_CONTROL = re.compile(rb"[\x01-\x1f]")
_INTEGER_STRINGS = re.compile(rb"(?:[+-]?[0-9]+)?(?:\\[+-]?[0-9]+)*\Z")
_PADDING_AGNOSTIC_VRS = frozenset({"LO", "LT", "SH", "ST", "UC", "UT"})
"""Text VRs whose values :func:`raw_text` converts as pydicom does whatever their padding."""
_LONG_LENGTH_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR",
                              "UT", "UV"})
_KNOWN_VRS = frozenset(TEXT_VRS | BINARY_VRS | set(NUMERIC_VRS) | {"AT"})
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00009, 0x7FE00008})
"""Where pydicom's ``stop_before_pixels`` stops."""
_FAST_SYNTAXES = frozenset(
    str(s) for s in AllTransferSyntaxes
    if s not in (ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian))
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQUENCE_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_GEOMETRY = ("Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
             "BitsStored")
_MAX_DEPTH = 16
_PIXEL_VALUE_TAGS = frozenset({0x00280106, 0x00280107, 0x00280108, 0x00280109})
"""Smallest/Largest Image/Series Pixel Value: "US or SS" by Pixel Representation (PS3.3)."""


def raw_text(value: bytes, vr: str, encoding: str) -> str | list[str] | None:
    """A text value straight from its bytes, as pydicom would give it (None: empty).

    Raises ValueError for padding inside a value (a space or NUL next to a ``\\``, leading
    spaces, embedded NULs) of a VR whose conversion pydicom does its own way there.
    """
    if vr not in _PADDING_AGNOSTIC_VRS:
        core = value.rstrip(b"\x00" if vr == "UI" else b" ")
        if (b"\x00" in core or core[:1] == b" " or b" \\" in core or b"\\ " in core
                or _CONTROL.search(core)):
            raise ValueError("padding or control characters inside the value")
        if vr == "IS" and not _INTEGER_STRINGS.match(core):
            raise ValueError("an IS value pydicom would normalise")
    if vr == "PN" and b"=" in value:
        raise ValueError("person name component groups: pydicom normalises them")
    text = value.decode(encoding if vr in CHARSET_VRS else "ascii")
    if vr in SINGLE_VALUED_VRS:
        text = text.rstrip(" \x00")
        return text[:MAX_VALUE_CHARS] if text else None
    strip = " \x00"
    parts = [p.strip(strip) if vr in STRIPPED_BOTH_ENDS else p.rstrip(strip)
             for p in text.split("\\")]
    if len(parts) == 1:
        return parts[0][:MAX_VALUE_CHARS] if parts[0] else None
    return [p[:MAX_VALUE_CHARS] for p in parts]


def raw_numbers(value: bytes, vr: str, little_endian: bool = True) -> str | list[str] | None:
    """Binary numbers as pydicom gives them, as text; raises ValueError on a bad length."""
    fmt = NUMERIC_VRS[vr]
    size = struct.calcsize("<" + fmt)
    if not value or len(value) % size:
        raise ValueError("length is not a multiple of the value size")
    endian = "<" if little_endian else ">"
    numbers = struct.unpack(f"{endian}{len(value) // size}{fmt}", value)
    return str(numbers[0]) if len(numbers) == 1 else [str(n) for n in numbers]


def raw_tags(value: bytes) -> str | list[str]:
    """AT values as pydicom prints them, ``(gggg,eeee)``; raises ValueError on a bad length."""
    if not value or len(value) % 4:
        raise ValueError("length is not a multiple of 4")
    pairs = struct.unpack(f"<{len(value) // 2}H", value)
    tags = [f"({g:04X},{e:04X})" for g, e in zip(pairs[::2], pairs[1::2], strict=True)]
    return tags[0] if len(tags) == 1 else tags


def _private_vr(tag: int, creators: dict[int, str]) -> str | None:
    """The VR pydicom gives a private element of an implicit VR data set (PS3.5 6.2.2; None:
    ask pydicom): LO for a private creator, the private dictionary's VR under its creator,
    else UN (not indexed)."""
    element = tag & 0xFFFF
    if 0x10 <= element <= 0xFF:
        return "LO"
    creator = creators.get((tag & 0xFFFF0000) | element >> 8) if element & 0xFF00 else None
    if not creator:
        return "UN"
    try:
        vr = private_dictionary_VR(tag, creator)
    except KeyError:
        return "UN"
    return vr if vr in _KNOWN_VRS else None


@lru_cache(maxsize=4096)
def attribute_key(tag: int) -> str:
    """The index's key of an attribute: its keyword, or ``(gggg,eeee)`` for private tags and
    repeating groups (overlays, curves), as pydicom's ``DataElement.keyword`` names them."""
    keyword = dictionary_keyword(tag) if dictionary_has_tag(tag) else ""
    return keyword or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


@lru_cache(maxsize=4096)
def _implicit_vr(tag: int) -> str | None:
    """The VR pydicom gives a public element of an implicit VR data set (None: ask pydicom)."""
    if tag >> 16 & 1:
        return None
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return None
    return vr if vr in _KNOWN_VRS else None  # "US or SS", "OB or OW", …: pydicom decides


_CONVERTED: dict[tuple[int, str, str, bytes], tuple[str, str | list[str] | None]] = {}
"""An element's index key and converted value by (tag, VR, encoding, bytes). The instances of
a series repeat most of their header (patient, study, series, equipment, geometry): each
distinct element is converted once, in one lookup. A value that does not convert raises each
time and is never stored."""
_CACHED_VALUES = 16_384
_CACHED_VALUE_BYTES = 256


class _Skip(Exception):
    """Not for the fast path: read this instance with pydicom."""


@dataclass(frozen=True)
class ScannedHeader:
    transfer_syntax: str
    implicit_vr: bool
    attributes: dict[str, str | list[str]]
    stop_offset: int
    """Offset of the pixel data element, or the length of the bytes when there is none."""


_ELEMENT = struct.Struct("<HHHH").unpack_from
"""Group, element, then the next four bytes as two halves: the VR and the short length of an
explicit VR element, or the two halves of an implicit one's 32-bit length."""
_LENGTH = struct.Struct("<L").unpack_from
_VR_CODES: dict[int, tuple[str, bool]] = {
    int.from_bytes(vr.encode("ascii"), "little"): (vr, vr in _LONG_LENGTH_VRS)
    for vr in _KNOWN_VRS}
"""Known VRs by their two bytes read as a little endian number, with whether a 32-bit length
follows (PS3.5 7.1.2)."""


def _element_header(data: Received, pos: int, end: int, implicit: bool) -> tuple[int, str | None,
                                                                                 int, int]:
    """(tag, VR or None when implicit, value length, value offset) of the element at ``pos``."""
    if pos + 8 > end:
        raise _Skip
    group, element, low, high = _ELEMENT(data, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        return tag, None, low | high << 16, pos + 8
    known = _VR_CODES.get(low)
    if known is None:
        raise _Skip
    vr, long_length = known
    if long_length:
        if pos + 12 > end:
            raise _Skip
        return tag, vr, _LENGTH(data, pos + 8)[0], pos + 12
    return tag, vr, high, pos + 8


def _skip_sequence(data: Received, pos: int, end: int, implicit: bool, depth: int) -> int:
    """Offset just past an undefined-length sequence whose first item starts at ``pos``."""
    if depth > _MAX_DEPTH:
        raise _Skip
    while True:
        tag, _vr, length, at = _element_header(data, pos, end, implicit)
        if tag == _SEQUENCE_END:
            return at
        if tag != _ITEM:
            raise _Skip
        if length != _UNDEFINED:
            pos = at + length
            continue
        pos = at
        while True:  # an undefined-length item: its elements, to the item delimiter
            tag, vr, length, at = _element_header(data, pos, end, implicit)
            if tag == _ITEM_END:
                pos = at
                break
            if length == _UNDEFINED:
                if not (vr is None or vr in ("SQ", "UN")):
                    raise _Skip
                pos = _skip_sequence(data, at, end, implicit, depth + 1)
            else:
                pos = at + length
            if pos > end:
                raise _Skip


def _meta(data: Received, end: int, regions: _Regions | None = None) -> tuple[str, int]:
    """(Transfer Syntax UID, offset of the data set) from a Part 10 file meta."""
    if end < 132 or data[128:132] != b"DICM":
        raise _Skip
    pos, syntax = 132, None
    if regions is not None:
        regions.add(0, 128, None, 0)  # the preamble: never read, no length of its own
    while pos + 8 <= end and data[pos:pos + 2] == b"\x02\x00":
        tag, vr, length, at = _element_header(data, pos, end, False)
        if vr is None or length == _UNDEFINED or at + length > end:
            raise _Skip
        if tag == 0x00020010:
            syntax = bytes(data[at:at + length]).decode("ascii").strip(" \x00")
        elif regions is not None and length:
            # Read past: only the transfer syntax counts.
            regions.add(at, at + length, None, _length_field(at, vr, False))
        pos = at + length
    if syntax not in _FAST_SYNTAXES:
        raise _Skip
    return syntax, pos


def _scan(data: Received, regions: _Regions | None = None) -> ScannedHeader:
    end = len(data)
    syntax, pos = _meta(data, end, regions)
    implicit = syntax == ImplicitVRLittleEndian
    if implicit and pos + 6 <= end and bytes(data[pos + 4:pos + 6]).isupper() \
            and bytes(data[pos + 4:pos + 6]).decode("ascii") in _KNOWN_VRS:
        raise _Skip  # explicit VR under an implicit syntax: pydicom notices and adapts
    raws: list[tuple[int, str, int, int]] = []
    creators: dict[int, str] = {}
    pixel_representation: int | None = None
    last_tag = -1
    encoding = "ascii"
    element_at, vr_codes, pixel_tags = _ELEMENT, _VR_CODES, _PIXEL_TAGS
    while pos < end:
        # _element_header, inlined: this loop runs for every element of every instance.
        if pos + 8 > end:
            raise _Skip
        group, element, low, high = element_at(data, pos)
        tag = group << 16 | element
        if implicit or group == 0xFFFE:
            vr, length, at = None, low | high << 16, pos + 8
        else:
            known = vr_codes.get(low)
            if known is None:
                raise _Skip
            vr = known[0]
            if known[1]:
                if pos + 12 > end:
                    raise _Skip
                length, at = _LENGTH(data, pos + 8)[0], pos + 12
            else:
                length, at = high, pos + 8
        if tag in pixel_tags:
            break
        if tag >> 16 in (0x0002, 0xFFFE) or tag <= last_tag:
            raise _Skip  # out of order or repeated: pydicom decides which one counts
        last_tag = tag
        if vr is None:
            vr = _implicit_vr(tag) if not tag >> 16 & 1 else _private_vr(tag, creators)
            if vr is None and tag in _PIXEL_VALUE_TAGS and pixel_representation in (0, 1):
                vr = "SS" if pixel_representation else "US"
            if vr is None:
                raise _Skip
        if length == _UNDEFINED:
            if vr not in ("SQ", "UN") or (vr == "UN" and not implicit):
                raise _Skip
            pos = _skip_sequence(data, at, end, implicit, 0)
            continue
        pos = at + length
        if pos > end:
            raise _Skip
        if vr == "UN" and not implicit:
            raise _Skip  # pydicom converts it by the dictionary: let it
        if vr in BINARY_VRS or tag >> 16 == 0x7FE0:
            if regions is not None and length:
                regions.add(at, pos, None, _length_field(at, vr, implicit))  # skipped unread
            continue
        if regions is not None and length and tag != 0x00080005 and tag != 0x00280103 \
                and not (implicit and tag >> 16 & 1 and 0x10 <= tag & 0xFFFF <= 0xFF):
            # Converted: its bytes alone make its value.
            regions.add(at, pos, (tag, vr), _length_field(at, vr, implicit))
        if tag == 0x00080005:
            name = bytes(data[at:pos]).decode("ascii", "replace").strip(" \x00")
            if name not in FAST_CHARSETS:
                raise _Skip
            encoding = FAST_CHARSETS[name]
        elif tag == 0x00280103 and length == 2:
            pixel_representation = struct.unpack_from("<H", data, at)[0]
        elif implicit and tag >> 16 & 1 and 0x10 <= tag & 0xFFFF <= 0xFF:
            creators[tag] = bytes(data[at:pos]).decode(encoding, "replace").strip(" \x00")
        raws.append((tag, vr, at, length))
    if not raws:
        raise _Skip  # empty data sets and the like: pydicom says what is wrong
    attributes: dict[str, str | list[str]] = {}
    converted_values = _CONVERTED
    try:
        for tag, vr, at, length in raws:
            if not length:
                continue
            value = bytes(data[at:at + length])
            remembered = converted_values.get((tag, vr, encoding, value))
            if remembered is None:
                remembered = _convert(tag, vr, encoding, value)
            keyword, converted = remembered
            if converted is not None:
                # A list is copied: the remembered one must not change with the caller's.
                attributes[keyword] = (converted if converted.__class__ is str
                                       else list(converted))
    except (UnicodeDecodeError, ValueError, struct.error):
        raise _Skip from None
    _require_plain_geometry(attributes)
    if regions is not None:
        regions.encoding = encoding
    return ScannedHeader(syntax, implicit, attributes, pos if pos < end else end)


def _convert(tag: int, vr: str, encoding: str, value: bytes
             ) -> tuple[str, str | list[str] | None]:
    """An element's index key and value converted as pydicom would (raises ValueError,
    UnicodeDecodeError or struct.error where the fast path cannot), remembered when short."""
    remembered = (attribute_key(tag),
                  raw_text(value, vr, encoding) if vr in TEXT_VRS
                  else raw_tags(value) if vr == "AT" else raw_numbers(value, vr))
    if len(value) <= _CACHED_VALUE_BYTES:
        if len(_CONVERTED) >= _CACHED_VALUES:
            _CONVERTED.clear()
        _CONVERTED[(tag, vr, encoding, value)] = remembered
    return remembered


def _require_plain_geometry(attributes: dict[str, str | list[str]]) -> None:
    """Leave to pydicom (``_Skip``) a header whose geometry values are not plain digits."""
    for keyword in _GEOMETRY:  # the checks convert these; pydicom's IS/US rules differ at edges
        number = attributes.get(keyword)
        if number is not None and not (isinstance(number, str) and number.isdigit()):
            raise _Skip


def _length_field(at: int, vr: str, implicit: bool) -> int:
    """Where the value length of the element whose value starts at ``at`` begins (PS3.5 7.1):
    4 bytes before it in an implicit VR data set and for the VRs with a 32-bit length, else 2."""
    return at - 4 if implicit or vr in _LONG_LENGTH_VRS else at - 2


class _Regions:
    """Where the bytes read by a scan may change without changing how the rest is read: the
    values of elements read past unread, and of elements converted by their bytes alone (with
    the tag and VR to convert them again), and the value length of each, which may change
    too: the walk then goes on as before, that many bytes further. Everything else (element
    headers, the transfer syntax, Specific Character Set, Pixel Representation, private
    creators, the items of undefined-length sequences) decides the walk itself."""

    __slots__ = ("elements", "encoding", "ends", "fields", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.fields: list[int] = []
        """Where each value's length begins (its start when it has none: the preamble)."""
        self.elements: list[tuple[int, str] | None] = []
        self.encoding = "ascii"
        """The text encoding the scan settled on (Specific Character Set)."""

    def add(self, start: int, end: int, element: tuple[int, str] | None, field: int) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.elements.append(element)
        self.fields.append(field)


@dataclass(frozen=True)
class _Layout:
    """A head scanned in full, for reading the next head of the same association."""

    header: ScannedHeader
    """Its header, with a copy of the attributes of its own."""
    prefix: bytes
    """The head up to its pixel data element's tag, included."""
    regions: _Regions


_NONZERO = re.compile(rb"[^\x00]+").finditer
_SAME_LAYOUT = threading.local()
"""The last head each association thread scanned in full (:func:`scan_next`)."""


def scan_next(data: bytes) -> ScannedHeader | None:
    """:func:`scan` for the heads of instances arriving one after another on an association.

    The instances of a series mostly differ in a few values (the SOP Instance UID, Instance
    Number, position). When the bytes of this head differ from the last one this thread
    scanned in full only inside such values, the header is that one's with those values
    converted again, which is what a full scan gives; a difference anywhere else (an element
    header, a length, the character set, a sequence) scans in full. Only heads whose scan
    stopped at the pixel data are remembered, and only bytes are compared, never meaning.
    """
    layout: _Layout | None = getattr(_SAME_LAYOUT, "layout", None)
    if layout is not None:
        try:
            header = _scan_like(data, layout)
        except (_Skip, struct.error, UnicodeDecodeError, ValueError, IndexError):
            return None  # a changed value the fast path cannot convert: a full scan cannot
        if header is not None:
            return header
    regions = _Regions()
    try:
        header = _scan(data, regions)
    except (_Skip, struct.error, UnicodeDecodeError, ValueError, IndexError):
        _SAME_LAYOUT.layout = None
        return None
    stop = header.stop_offset
    _SAME_LAYOUT.layout = (
        _Layout(ScannedHeader(header.transfer_syntax, header.implicit_vr,
                              _copied(header.attributes), stop),
                bytes(data[:stop + 4]), regions)
        if stop + 4 <= len(data) else None)
    return header


def _copied(attributes: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
    return {key: value if value.__class__ is str else list(value)
            for key, value in attributes.items()}


_MAX_RESIZED = 8
"""Values of another length one head may have before it is scanned in full instead."""


def _scan_like(data: bytes, layout: _Layout) -> ScannedHeader | None:
    """The header of ``data`` read through ``layout``, or None: it must be scanned in full.

    The bytes are compared with the layout's head; they may differ only inside the values
    of its regions. A value may also have another length (an Instance Number of one more
    digit, a shorter UID): its length field then differs, and the comparison goes on past
    the new value, the layout's bytes that many further on.
    """
    prefix = layout.prefix
    size = len(prefix)
    previous, regions = layout.header, layout.regions
    starts, ends, elements, fields = regions.starts, regions.ends, regions.elements, regions.fields
    changed: list[tuple[int, str, int, int]] = []  # tag, VR, start and end in ``data``
    old = new = 0  # prefix[old:size] is to be found at data[new:]
    for _ in range(_MAX_RESIZED + 1):
        rest = size - old
        if new + rest > len(data):
            return None
        ours = prefix[old:] if old else prefix
        theirs = data[new:new + rest]
        if theirs == ours:
            break
        shift = new - old
        difference = (int.from_bytes(theirs, "little")
                      ^ int.from_bytes(ours, "little")).to_bytes(rest, "little")
        resized = False
        for run in _NONZERO(difference):
            first, last = run.span()
            first += old
            last += old
            i = bisect_right(starts, first) - 1
            if i >= 0 and last <= ends[i]:  # inside a value
                element = elements[i]
                if element is not None and (not changed or changed[-1][2] != starts[i] + shift):
                    changed.append((*element, starts[i] + shift, ends[i] + shift))
                continue
            i += 1  # else it must start in the length of the next value
            if i == len(starts) or not fields[i] <= first:
                return None  # outside a value that may change
            field, start = fields[i] + shift, starts[i] + shift
            length = int.from_bytes(data[field:start], "little")
            if length == _UNDEFINED or (previous.implicit_vr and data[field:field + 2].isupper()):
                return None  # a VR where a length was (the full scan steps aside there)
            element = elements[i]
            if element is not None:
                changed.append((*element, start, start + length))
            old, new = ends[i], start + length
            resized = True
            break
        if not resized:
            break
    else:
        return None
    attributes = _copied(previous.attributes)
    encoding = regions.encoding
    for tag, vr, start, end in changed:
        value = data[start:end]
        remembered = _CONVERTED.get((tag, vr, encoding, value))
        if remembered is None:
            remembered = _convert(tag, vr, encoding, value)
        keyword, converted = remembered
        if (converted is None) != (keyword not in attributes):
            return None  # a value appears or disappears: keep the full scan's order
        if converted is not None:
            attributes[keyword] = converted if converted.__class__ is str else list(converted)
    _require_plain_geometry(attributes)
    return ScannedHeader(previous.transfer_syntax, previous.implicit_vr, attributes,
                         previous.stop_offset + new - old)


def scan(data: Received) -> ScannedHeader | None:
    """The header of a simple instance read from its bytes, or None: read it with pydicom."""
    try:
        return _scan(data)
    except (_Skip, struct.error, UnicodeDecodeError, ValueError, IndexError):
        return None  # anything unexpected in the bytes: pydicom reads them and says what
