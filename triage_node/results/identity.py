"""Deterministic UIDs for result objects, so a re-delivery never duplicates a result.

Every UID the results stage writes (Series and SOP Instance UIDs of SEG/SR/KOS/heatmap, Tracking
UIDs of findings, the Device Observer UID) is *derived*, not random: it is a hash of what
the object is about. Encoding the same detector output for the same source series twice
gives byte-for-byte the same UIDs, so a PACS or Orthanc that receives it again replaces
(or ignores) the instance instead of showing a second copy. A new detector version gives
new UIDs, so its results form a new series beside the old one.

Root: by default ``1.2.826.0.1.3680043.8.498.`` — pydicom's root, under which pydicom
lets any application create UIDs (PS3.5 9.1). ``pydicom.uid.generate_uid`` appends the
SHA-512 of the sources as a decimal integer, truncated to the 64-character limit (PS3.5
9.1), i.e. about 118 bits of hash below the root. A site that owns a root can pass it as
``uid_root`` (at most 54 characters, ending in a dot).

The hashed sources start with a namespace and a scheme version (``triage-node/uid/v1``):
changing what goes into a UID must bump the version, never silently reuse the old one.
Each source is written as ``<length>:<text>`` because ``generate_uid`` concatenates its
sources, and ``("ab", "c")`` must not collide with ``("a", "bc")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from pydicom.uid import PYDICOM_ROOT_UID, UID, generate_uid

__all__ = [
    "DEFAULT_UID_ROOT",
    "ResultIdentity",
    "ResultKind",
    "check_uid_root",
    "derive_uid",
    "device_observer_uid",
    "engine_device_uid",
]

DEFAULT_UID_ROOT: str = PYDICOM_ROOT_UID
"""pydicom's UID root, usable by any pydicom application (see module docstring)."""

_NAMESPACE = "triage-node/uid/v1"
_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class ResultKind(StrEnum):
    """The kinds of result object the node writes; part of every derived UID."""

    SEG = "SEG"
    SR = "SR"
    KOS = "KOS"
    HEATMAP = "HEATMAP"
    """Secondary Capture of the source image with the detector's heatmap blended in.

    Added after v1 UIDs were in use: a new kind only adds new hash inputs, every existing
    (study, series, detector, version, kind) still hashes to the same UID, so the scheme
    version stays ``v1``."""


def check_uid_root(uid_root: str, attribute: str = "uid_root") -> None:
    """Raise ``ValueError`` naming ``attribute`` unless ``uid_root`` is a usable UID prefix.

    A prefix must be a valid UID followed by a dot, at most 54 characters so that the
    hash suffix keeps enough digits (``generate_uid``'s limit, PS3.5 9.1).
    """
    if not isinstance(uid_root, str) or len(uid_root) > 54 or not _ROOT_RE.match(uid_root):
        raise ValueError(
            f"{attribute} {uid_root!r} must be a UID prefix ending with '.', "
            "at most 54 characters"
        )


def derive_uid(*parts: str, uid_root: str = DEFAULT_UID_ROOT) -> UID:
    """Return the UID derived from ``parts`` under ``uid_root`` (same parts → same UID).

    Raises ``ValueError`` if the root is not a valid UID prefix ending in a dot of at most
    54 characters, or if no part is given.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    check_uid_root(uid_root)
    sources = [f"{len(p)}:{p}" for p in (_NAMESPACE, *parts)]
    return generate_uid(prefix=uid_root, entropy_srcs=sources)


@dataclass(frozen=True)
class ResultIdentity:
    """What a detector's results for one source series are about, and the UIDs that follow.

    The source Study and Series Instance UIDs are both included so that the same detector
    run on two series of one study (e.g. two reconstructions) yields distinct results.
    ``source_instance_uid`` is set when the detector analysed one image of the series on its
    own (per-image analysis, e.g. each view of a mammogram): it is then hashed too, so two
    images of one series never share a result UID. When it is None nothing is added, and
    every series-level UID stays what it was (the scheme version stays ``v1``).
    """

    study_instance_uid: str
    series_instance_uid: str
    detector: str
    detector_version: str
    uid_root: str = DEFAULT_UID_ROOT
    source_instance_uid: str | None = None

    def __post_init__(self) -> None:
        check_uid_root(self.uid_root, "ResultIdentity.uid_root")
        uids = [
            ("study_instance_uid", self.study_instance_uid),
            ("series_instance_uid", self.series_instance_uid),
        ]
        if self.source_instance_uid is not None:
            uids.append(("source_instance_uid", self.source_instance_uid))
        for attribute, value in uids:
            if not isinstance(value, str) or len(value) > 64 or not _UID_RE.match(value):
                raise ValueError(f"ResultIdentity.{attribute} is not a valid UID")
        if not self.detector:
            raise ValueError("ResultIdentity.detector must not be empty")
        if not self.detector_version:
            raise ValueError("ResultIdentity.detector_version must not be empty")

    def _uid(self, *parts: str) -> UID:
        image = () if self.source_instance_uid is None else ("image", self.source_instance_uid)
        return derive_uid(
            self.study_instance_uid,
            self.series_instance_uid,
            self.detector,
            self.detector_version,
            *image,
            *parts,
            uid_root=self.uid_root,
        )

    def series_instance_uid_for(self, kind: ResultKind | str) -> UID:
        """Series Instance UID (0020,000E) of the result series of ``kind``."""
        return self._uid("series", ResultKind(kind).value)

    def sop_instance_uid_for(self, kind: ResultKind | str, instance_number: int = 1) -> UID:
        """SOP Instance UID (0008,0018) of instance ``instance_number`` of ``kind``."""
        if instance_number < 1:
            raise ValueError(f"instance_number must be >= 1, got {instance_number}")
        return self._uid("instance", ResultKind(kind).value, str(instance_number))

    def tracking_uid_for(self, tracking_id: str) -> UID:
        """Tracking UID (TID 4108 / SEG Tracking UID) of the finding ``tracking_id``.

        Shared by the SEG segment and the SR measurement group of the same finding.
        """
        if not tracking_id:
            raise ValueError("tracking_id must not be empty")
        return self._uid("tracking", tracking_id)


def engine_device_uid(detector: str, engine_sha256: str) -> UID:
    """The Device UID of one trained engine: derived from its file's sha256, so every trained
    version gets a new one. ``trainers`` writes it into the manifest (``training.device_uid``)
    and the node checks it there against the engine it loads."""
    return derive_uid("engine", detector, engine_sha256)


def device_observer_uid(
    manufacturer: str,
    serial_number: str,
    detector: str,
    detector_version: str,
    *,
    engine_uid: str | None = None,
    uid_root: str = DEFAULT_UID_ROOT,
) -> UID:
    """Device Observer UID (TID 1004, (121012, DCM)) of one detector version on one node.

    The observer is the algorithm running on a particular device, so it is stable across
    studies and changes when the node, the detector version or — when the manifest carries
    one — the trained engine (``engine_uid``, :func:`engine_device_uid`) changes.
    """
    engine = () if engine_uid is None else (engine_uid,)
    return derive_uid(
        "device-observer", manufacturer, serial_number, detector, detector_version, *engine,
        uid_root=uid_root,
    )
