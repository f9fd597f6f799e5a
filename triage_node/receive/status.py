"""C-STORE response statuses we return (PS3.4 Annex B.2.3 / PS3.7 Annex C)."""

from __future__ import annotations

from enum import IntEnum


class StoreStatus(IntEnum):
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    """Refused: out of resources (disk below the configured watermark)."""
    NOT_AUTHORIZED = 0x0124
    """Refused: not authorized (a trusted AE title calling from a host it is not trusted on)."""
    CANNOT_UNDERSTAND = 0xC210
    """Error: cannot understand (the data set could not be parsed)."""
    PROCESSING_FAILURE = 0x0110
    """An unexpected failure of ours (e.g. the disk failed while writing)."""
