"""Who made a result: the node as a device, and the detector as an algorithm.

These feed the General Equipment module (PS3.3 C.7.5.1) of every result object, the
Segment Description's Algorithm Identification (PS3.3 C.8.20.2 / Table 10-19), the SR
observer context for a device (PS3.16 TID 1004) and the algorithm identification of SR
measurements (PS3.16 TID 4019).
"""

from __future__ import annotations

from dataclasses import dataclass

from triage_node import __version__ as _node_version
from triage_node.detectors.findings import Code
from triage_node.detectors.manifest import Manifest
from triage_node.results.identity import DEFAULT_UID_ROOT, check_uid_root, engine_device_uid

__all__ = ["AI_FAMILY", "AlgorithmInfo", "DeviceInfo", "EncodeOptions"]

AI_FAMILY = Code(value="123110", scheme="DCM", meaning="Artificial Intelligence")
"""Algorithm Family Code for AI detectors (PS3.16 CID 7162)."""
_ANATOMICAL_STRUCTURE = "91723000"
"""SCT Anatomical Structure (CID 7150): a label of this category is not a target finding."""


def _check_lo(owner: str, attribute: str, value: str | None, *, required: bool) -> None:
    """Check a value that lands in an LO element (PS3.5 6.2: 64 characters, no backslash)."""
    if value is None or value == "":
        if required:
            raise ValueError(f"{owner}.{attribute} must not be empty")
        return
    if not isinstance(value, str):
        raise ValueError(f"{owner}.{attribute} must be a str, got {type(value).__name__}")
    if len(value) > 64:
        raise ValueError(f"{owner}.{attribute} is {len(value)} characters long; at most 64 (LO)")
    if "\\" in value or any(ord(c) < 0x20 for c in value):
        raise ValueError(f"{owner}.{attribute} must not contain backslashes or control characters")


def _check_code(owner: str, attribute: str, code: Code) -> None:
    if not isinstance(code, Code):
        raise ValueError(f"{owner}.{attribute} must be a Code, got {type(code).__name__}")
    if not code.value or not code.scheme or not code.meaning:
        raise ValueError(f"{owner}.{attribute} needs a value, a scheme and a meaning")


@dataclass(frozen=True)
class DeviceInfo:
    """The node that writes results (General Equipment, PS3.3 C.7.5.1).

    ``serial_number`` identifies this node (Device Serial Number and the TID 1004 device
    observer); use the node id from its configuration, not a host name that changes.
    """

    serial_number: str
    manufacturer: str = "triage-node"
    software_version: str = _node_version
    institution_name: str | None = None
    institutional_department_name: str | None = None

    def __post_init__(self) -> None:
        _check_lo("DeviceInfo", "serial_number", self.serial_number, required=True)
        _check_lo("DeviceInfo", "manufacturer", self.manufacturer, required=True)
        _check_lo("DeviceInfo", "software_version", self.software_version, required=True)
        _check_lo("DeviceInfo", "institution_name", self.institution_name, required=False)
        _check_lo(
            "DeviceInfo",
            "institutional_department_name",
            self.institutional_department_name,
            required=False,
        )


@dataclass(frozen=True)
class AlgorithmInfo:
    """The detector that produced a result, and the device it ran on.

    ``name`` and ``version`` become Algorithm Name/Version and the Manufacturer Model Name
    of the result objects; they must equal ``DetectorResult.detector``/``.version``.
    ``target_findings`` are the finding types the detector looks for (its labels' codes);
    a negative SR states each of them as absent. ``procedure_reported`` is the TID 1500
    "Procedure reported" (PS3.16 CID 100); by default it follows the source modality.
    ``parameters`` are written as Algorithm Parameters (e.g. the operating threshold).
    ``from_manifest`` refuses a manifest whose Device UID belongs to another engine file.
    """

    name: str
    version: str
    device: DeviceInfo
    target_findings: tuple[Code, ...] = ()
    procedure_reported: Code | None = None
    family: Code = AI_FAMILY
    source: str | None = None
    """Algorithm Source (0066,0032): who made the algorithm, e.g. the training team."""
    parameters: tuple[tuple[str, str], ...] = ()
    engine_uid: str | None = None
    """The trained engine's Device UID (manifest ``training.device_uid``): it goes into the
    Device Observer UID, which therefore changes with every trained version."""

    def __post_init__(self) -> None:
        _check_lo("AlgorithmInfo", "name", self.name, required=True)
        _check_lo("AlgorithmInfo", "version", self.version, required=True)
        _check_lo("AlgorithmInfo", "source", self.source, required=False)
        if not isinstance(self.device, DeviceInfo):
            raise ValueError("AlgorithmInfo.device must be a DeviceInfo")
        _check_code("AlgorithmInfo", "family", self.family)
        for code in self.target_findings:
            _check_code("AlgorithmInfo", "target_findings", code)
        if self.procedure_reported is not None:
            _check_code("AlgorithmInfo", "procedure_reported", self.procedure_reported)
        for key, value in self.parameters:
            if not key or "=" in key or "\\" in key + value:
                raise ValueError(
                    f"AlgorithmInfo.parameters entry {key!r} must be a non-empty name without "
                    "'=' or backslash"
                )

    @classmethod
    def from_manifest(
        cls,
        manifest: Manifest,
        device: DeviceInfo,
        *,
        procedure_reported: Code | None = None,
    ) -> AlgorithmInfo:
        """Describe the detector of ``manifest`` (its labels give the target findings; a
        label whose category is SCT 91723000 Anatomical Structure, e.g. the midline band a
        brain tumour detector measures the midline shift on, is a reference structure, not a
        finding, and is left out)."""
        seen: dict[tuple[str, str], Code] = {}
        for label in manifest.labels:
            if label.category.value == _ANATOMICAL_STRUCTURE:
                continue
            code = label.finding_type.to_code()
            seen.setdefault((code.scheme, code.value), code)
        engine_uid = manifest.training.get("device_uid")
        if engine_uid is not None:
            expected = engine_device_uid(manifest.name, manifest.engine.sha256)
            if engine_uid != expected:
                raise ValueError(
                    f"{manifest.name}: manifest training.device_uid {engine_uid} does not "
                    f"belong to its engine (sha256 {manifest.engine.sha256[:16]}…, expected "
                    f"{expected}): re-export the engine")
        return cls(
            name=manifest.name,
            version=manifest.version,
            engine_uid=None if engine_uid is None else str(engine_uid),
            device=device,
            target_findings=tuple(seen.values()),
            procedure_reported=procedure_reported,
            parameters=(("probability_threshold", f"{manifest.probability_threshold:g}"),),
        )


@dataclass(frozen=True)
class EncodeOptions:
    """Choices about the result objects that are not about the algorithm.

    Series Numbers are fixed per kind so that re-delivered results land in the same place
    in a viewer's series list; ``uid_root`` is explained in :mod:`.identity`.
    """

    seg_series_number: int = 9901
    sr_series_number: int = 9902
    kos_series_number: int = 9903
    heatmap_series_number: int = 9904
    uid_root: str = DEFAULT_UID_ROOT
    disclaimer: str = "AI triage result; not for diagnostic use."
    """Written as the SEG Content Description, a comment in the SR, part of the KOS
    description and the heatmap's Image Comments (LO, ≤ 64 chars)."""

    def __post_init__(self) -> None:
        for attribute in (
            "seg_series_number",
            "sr_series_number",
            "kos_series_number",
            "heatmap_series_number",
        ):
            value = getattr(self, attribute)
            if not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
                raise ValueError(f"EncodeOptions.{attribute} must be an IS value, got {value!r}")
        check_uid_root(self.uid_root, "EncodeOptions.uid_root")
        _check_lo("EncodeOptions", "disclaimer", self.disclaimer, required=True)
