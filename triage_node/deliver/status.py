"""Names for DICOM status codes found in C-STORE responses and STOW-RS failure reasons.

A delivery error must say what the archive meant, not only a number: ``0xA700 (Refused: Out
of Resources)``. The meanings are PS3.4 Annex B.2.3 (Storage), PS3.7 Annex C (general) and
PS3.18 Table 10.5.3-1 / I.2-1 (STOW-RS failure reasons).
"""

from __future__ import annotations

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

# Failure reasons PS3.18 uses in a STOW-RS response beyond the C-STORE ones.
_STOW_ONLY: dict[int, str] = {
    0xC122: "Referenced Transfer Syntax not supported",
    0xA770: "Refused: Out of Resources (insufficient storage)",
}


def is_warning(code: int) -> bool:
    """Warning statuses (``0x0001``, ``0xB000``–``0xBFFF``): the object *was* stored."""
    return code == 0x0001 or 0xB000 <= code <= 0xBFFF


def describe_status(code: int) -> str:
    """``0xA700 (Refused: Out of Resources)``; unknown codes say so."""
    meaning = _STOW_ONLY.get(code)
    if meaning is None:
        known = STORAGE_SERVICE_CLASS_STATUS.get(code)
        meaning = known[1] if known is not None and known[1] else None
    if meaning is None:
        meaning = "warning" if is_warning(code) else "unknown status"
    return f"0x{code:04X} ({meaning})"
