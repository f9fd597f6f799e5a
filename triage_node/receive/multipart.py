"""multipart/related bodies (RFC 2387) as used by DICOMweb WADO-RS and STOW-RS (PS3.18 8.6)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from triage_node.errors import InvalidDicomError

_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)


@dataclass(frozen=True)
class Part:
    headers: dict[str, str]
    body: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()


def boundary_of(content_type: str) -> str:
    match = _BOUNDARY.search(content_type)
    if not match:
        raise InvalidDicomError("multipart/related Content-Type has no boundary parameter")
    return match.group(1)


def parse_multipart_related(body: bytes, content_type: str) -> list[Part]:
    """Split a multipart body into parts (headers lower-cased); raises on a malformed body."""
    if not content_type.lower().startswith("multipart/related"):
        raise InvalidDicomError(f"expected multipart/related, got {content_type.split(';')[0]}")
    delimiter = b"--" + boundary_of(content_type).encode("latin-1")
    chunks = body.split(delimiter)
    if len(chunks) < 3:
        raise InvalidDicomError("multipart body has no parts (boundary not found)")
    parts = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        chunk = chunk.removeprefix(b"\r\n")
        head, sep, payload = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise InvalidDicomError("multipart part without a header/body separator")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                headers[name.strip().lower()] = value.strip()
        parts.append(Part(headers, payload.removesuffix(b"\r\n")))
    return parts


def build_multipart_related(parts: list[bytes], boundary: str,
                            part_type: str = "application/dicom") -> bytes:
    """Encode ``parts`` as a multipart/related body (for STOW-RS clients and tests)."""
    out = bytearray()
    for data in parts:
        out += f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
        out += data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out)
