"""A site's own cases for training and evaluation, listed in a manifest (docs/training.md).

A manifest (YAML or CSV) lists cases; each has an ``image`` — a NIfTI file (``.nii``,
``.nii.gz``) or a folder holding one DICOM series — and a ``label`` — a NIfTI mask on the
image's grid, or a DICOM-SEG (PS3.3 A.51) whose frames reference that series — with an optional
``split`` (``train``, ``validation``, ``test``) and ``stratum`` (for stratified k-fold).

Loading a case gives what a phantom gives (:meth:`DatasetCase.generate`): modality values
indexed ``[z, y, x]`` with spacing, origin and orientation in the DICOM patient system (LPS,
mm, PS3.3 C.7.6.2), and a boolean mask on the same grid.

* DICOM series are read by the node's own :func:`triage_node.imaging.loader.load_series`,
  so training sees exactly the volume serving sees.
* NIfTI world coordinates are RAS+ (NIfTI-1 ``qform``/``sform``): the affine is turned into LPS
  by negating its first two rows, and the voxel axes are permuted and flipped so that columns
  run towards patient left (+x), rows towards posterior (+y) and slices towards head (+z) —
  the layout of an axial DICOM series, whatever order the converter stored. Spatial units
  other than mm (``xyzt_units``: metres, microns) are converted to mm.
* DICOM-SEG frames are mapped to the series' instances by Referenced SOP Instance UID
  (highdicom ``get_pixels_by_source_instance``); all segments are merged into one mask.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from triage_node.errors import ConfigError, InvalidDicomError
from triage_node.imaging.loader import load_series
from triage_node.imaging.volume import Volume

SPLITS = ("train", "validation", "test")
FIELDS = ("image", "label", "split", "stratum", "modality")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: mm per spatial unit of NIfTI ``xyzt_units`` (``unknown`` is taken as mm, as most tools do).
_NIFTI_UNITS_MM = {"mm": 1.0, "meter": 1000.0, "micron": 0.001, "unknown": 1.0}
#: Two grids are the same when spacing/origin agree to this (mm) and cosines to 1e-3.
_GEOMETRY_TOLERANCE_MM = 1e-2


class DatasetError(ConfigError):
    """A manifest or one of its cases cannot be used; the message names file, line and field."""


_ErrorFor = Callable[[str, str], DatasetError]
"""``(field, message) -> DatasetError`` naming the case (:meth:`DatasetCase.error`)."""


@dataclass(frozen=True)
class DatasetCase:
    """One manifest entry; ``where`` is ``"FILE line N"`` (YAML) or ``"FILE row N"`` (CSV)."""

    index: int
    image: str
    label: str
    split: str
    stratum: str
    where: str
    modality: str = "CT"
    """Modality of a NIfTI image (NIfTI does not record it); a DICOM series names its own."""

    @property
    def bleed_ml(self) -> None:
        """No requested size (phantoms have one; a real case only has its measured mask)."""
        return None

    def error(self, field: str, message: str) -> DatasetError:
        """A :class:`DatasetError` naming this entry and ``field``."""
        return DatasetError(f"{self.where}, field {field!r}: {message}")

    def load(self) -> tuple[Volume, np.ndarray]:
        """The image volume and its boolean mask on the same grid."""
        image = Path(self.image)
        label = Path(self.label)
        if not image.exists():
            raise self.error("image", f"{image} does not exist")
        if not label.exists():
            raise self.error("label", f"{label} does not exist")
        if image.is_dir():
            paths = sorted(
                p for p in image.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.name != "DICOMDIR"
                and p.resolve() != label.resolve()
            )
            try:
                volume = load_series(paths)
            except InvalidDicomError as exc:
                raise self.error("image", f"DICOM series in {image}: {exc}") from exc
        elif _is_nifti(image):
            volume = replace(_nifti_volume(image, self.error, "image"), modality=self.modality)
        else:
            raise self.error("image", f"{image} is neither a .nii/.nii.gz file nor a folder")
        if _is_nifti(label):
            mask_volume = _nifti_volume(label, self.error, "label")
            _check_same_grid(volume, mask_volume, self.error)
            mask = mask_volume.array != 0
        elif label.is_file():
            mask = _seg_mask(label, volume, self.error)
        else:
            raise self.error("label", f"{label} is neither a .nii/.nii.gz file nor a DICOM-SEG")
        return volume, mask

    def generate(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """``(array, mask, info)`` in the shape :meth:`trainers.data.CaseSpec.generate` has."""
        volume, mask = self.load()
        return volume.array.astype(np.float32, copy=False), mask, self.info(volume, mask)

    def info(self, volume: Volume, mask: np.ndarray) -> dict[str, Any]:
        """The phantom ``info`` keys the training and evaluation code reads, for this case."""
        positive = bool(mask.any())
        return {
            "bleed_ml": float(np.count_nonzero(mask)) * volume.voxel_volume_ml,
            "bleed_kind": (self.stratum or "labelled") if positive else None,
            "decoys": [],
            "noise_hu": None,
            "spacing": list(volume.spacing),
            "origin": list(volume.origin),
            "orientation": list(volume.orientation),
        }


@dataclass(frozen=True)
class DatasetManifest:
    """The cases of one manifest file, in file order."""

    path: Path
    cases: tuple[DatasetCase, ...]

    def split(self, name: str) -> list[DatasetCase]:
        """The cases of split ``name`` (a case without ``split`` is a ``train`` case)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, not {name!r}")
        return [c for c in self.cases if c.split == name]

    def require(self, name: str, purpose: str) -> list[DatasetCase]:
        """:meth:`split`, raising a :class:`DatasetError` when it has no case."""
        cases = self.split(name)
        if not cases:
            raise DatasetError(f"{self.path}: no case with split {name!r}, needed {purpose}")
        return cases

    def fingerprint(self) -> str:
        """Short hash of the entries and their files' sizes and times (names the data cache)."""
        h = hashlib.sha256()
        for case in self.cases:
            h.update(f"{case.image}|{case.label}|{case.split}|{case.stratum}\n".encode())
            for name in (case.image, case.label):
                path = Path(name)
                files = sorted(path.iterdir()) if path.is_dir() else [path]
                for f in files:
                    if f.exists():
                        st = f.stat()
                        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(_NIFTI_SUFFIXES)


def read_manifest(path: Path) -> DatasetManifest:
    """Read a ``.yaml``/``.yml`` or ``.csv`` manifest; paths are relative to its folder.

    Checks every entry's fields and that its files exist (not their contents: those are
    checked when a case is loaded); raises :class:`DatasetError` naming line/row and field.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: dataset manifest not found")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        entries = _yaml_entries(path)
    elif suffix == ".csv":
        entries = _csv_entries(path)
    else:
        raise DatasetError(f"{path}: a dataset manifest is a .yaml, .yml or .csv file")
    if not entries:
        raise DatasetError(f"{path}: the manifest lists no cases")
    base = path.parent
    cases: list[DatasetCase] = []
    for index, (where, fields) in enumerate(entries):
        unknown = sorted(set(fields) - set(FIELDS))
        if unknown:
            raise DatasetError(
                f"{where}, field {unknown[0]!r}: unknown field; expected one of {FIELDS}"
            )
        for required in ("image", "label"):
            if not fields.get(required):
                raise DatasetError(f"{where}, field {required!r}: missing")
        split = fields.get("split") or "train"
        if split not in SPLITS:
            raise DatasetError(
                f"{where}, field 'split': {split!r} is not one of {', '.join(SPLITS)}"
            )
        files = {name: base / fields[name] for name in ("image", "label")}
        for name, file in files.items():
            if not file.exists():
                raise DatasetError(f"{where}, field {name!r}: {file} does not exist")
        cases.append(
            DatasetCase(
                index=index,
                image=str(files["image"]),
                label=str(files["label"]),
                split=split,
                stratum=fields.get("stratum") or "",
                where=where,
                modality=fields.get("modality") or "CT",
            )
        )
    return DatasetManifest(path=path, cases=tuple(cases))


def _yaml_entries(path: Path) -> list[tuple[str, dict[str, str]]]:
    """``cases:`` items with the line each starts on; composed (not loaded) to keep lines."""
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise DatasetError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(root, yaml.MappingNode):
        raise DatasetError(f"{path}: expected a mapping with a 'cases' list")
    keys = {k.value: v for k, v in root.value if isinstance(k, yaml.ScalarNode)}
    extra = sorted(set(keys) - {"cases"})
    if extra:
        raise DatasetError(f"{path}, key {extra[0]!r}: unknown; expected only 'cases'")
    cases = keys.get("cases")
    if not isinstance(cases, yaml.SequenceNode):
        raise DatasetError(f"{path}, key 'cases': missing or not a list")
    entries: list[tuple[str, dict[str, str]]] = []
    for item in cases.value:
        where = f"{path} line {item.start_mark.line + 1}"
        if not isinstance(item, yaml.MappingNode):
            raise DatasetError(f"{where}: a case is a mapping of {', '.join(FIELDS)}")
        fields: dict[str, str] = {}
        for key, value in item.value:
            if not isinstance(value, yaml.ScalarNode):
                raise DatasetError(
                    f"{path} line {value.start_mark.line + 1}, field {key.value!r}: "
                    "expected a single value"
                )
            fields[str(key.value)] = str(value.value).strip()
        entries.append((where, fields))
    return entries


def _csv_entries(path: Path) -> list[tuple[str, dict[str, str]]]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        unknown = [h for h in header if h not in FIELDS]
        if unknown:
            raise DatasetError(
                f"{path} row 1, column {unknown[0]!r}: unknown; expected {', '.join(FIELDS)}"
            )
        entries: list[tuple[str, dict[str, str]]] = []
        for row in reader:
            fields = {
                str(k).strip(): (v or "").strip() for k, v in row.items() if k is not None
            }
            if not any(fields.values()):
                continue
            entries.append((f"{path} row {reader.line_num}", fields))
    return entries


def _nifti_volume(path: Path, error: _ErrorFor, field: str) -> Volume:
    """A NIfTI file as a Volume in LPS, axes reordered to the axial DICOM layout."""
    import nibabel as nib

    try:
        img: Any = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float32))
        unit = img.header.get_xyzt_units()[0]
    except Exception as exc:
        raise error(field, f"cannot read NIfTI {path}: {exc}") from exc
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise error(field, f"{path} has shape {data.shape}; a 3-D volume is needed")
    scale = _NIFTI_UNITS_MM.get(str(unit), 1.0)
    # RAS+ → LPS: negate the x and y world rows of the affine.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, dtype=float)
    affine[:3] *= scale
    axes = affine[:3, :3]
    # Voxel axis of each world axis (x, y, z), then flip any that points the wrong way.
    dominant = np.argmax(np.abs(axes), axis=0)  # world axis of voxel axes i, j, k
    if sorted(dominant.tolist()) != [0, 1, 2]:
        raise error(field, f"{path}: the affine does not map voxel axes to distinct world axes")
    voxel_axis_of_world = [int(np.where(dominant == w)[0][0]) for w in range(3)]
    # Array order [z, y, x] = voxel axes of world (z, y, x).
    order = [voxel_axis_of_world[2], voxel_axis_of_world[1], voxel_axis_of_world[0]]
    array = np.transpose(data, order)
    columns = axes[:, order]  # world direction of array axes z, y, x
    origin = affine[:3, 3].copy()
    for a in range(3):
        world = 2 - a
        if columns[world, a] < 0:
            origin = origin + columns[:, a] * (array.shape[a] - 1)
            array = np.flip(array, axis=a)
            columns[:, a] = -columns[:, a]
    spacing = np.linalg.norm(columns, axis=0)
    if np.any(spacing <= 0):
        raise error(field, f"{path}: the affine has a zero voxel size")
    units = columns / spacing
    normal = np.cross(units[:, 2], units[:, 1])  # row direction × column direction
    if not np.allclose(normal, units[:, 0], atol=1e-3):
        raise error(field, f"{path}: the voxel axes are not orthogonal (sheared affine)")
    return Volume(
        array=np.ascontiguousarray(array, dtype=np.float32),
        spacing=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        orientation=(
            float(units[0, 2]), float(units[1, 2]), float(units[2, 2]),
            float(units[0, 1]), float(units[1, 1]), float(units[2, 1]),
        ),
        modality="",
        study_instance_uid="",
        series_instance_uid="",
        source_datasets=[],
    )


def _check_same_grid(image: Volume, label: Volume, error: _ErrorFor) -> None:
    if image.shape != label.shape:
        raise error(
            "label", f"mask shape {list(label.shape)} differs from the image's {list(image.shape)}"
        )
    for name, a, b, tol in (
        ("spacing", image.spacing, label.spacing, _GEOMETRY_TOLERANCE_MM),
        ("origin", image.origin, label.origin, _GEOMETRY_TOLERANCE_MM),
        ("orientation", image.orientation, label.orientation, 1e-3),
    ):
        if not np.allclose(a, b, atol=tol):
            raise error(
                "label",
                f"mask {name} {[round(v, 4) for v in b]} differs from the image's "
                f"{[round(v, 4) for v in a]}",
            )


def _seg_mask(path: Path, volume: Volume, error: _ErrorFor) -> np.ndarray:
    """The union of a DICOM-SEG's segments on ``volume``'s slices (PS3.3 C.8.20)."""
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:
        raise error("label", f"{path} is not a readable DICOM-SEG: {exc}") from exc
    referenced = seg.get_source_image_uids()
    series = {str(s) for _, s, _ in referenced}
    if volume.series_instance_uid not in series:
        raise error(
            "label",
            f"DICOM-SEG {path.name} references series {sorted(series)}, not the image's "
            f"series {volume.series_instance_uid}",
        )
    if volume.is_multi_frame_source:
        raise error("label", "DICOM-SEG labels for multi-frame image series are not supported")
    slice_uids = [str(volume.slice_source(k)[0].SOPInstanceUID) for k in range(volume.shape[0])]
    # Instances without a SEG frame (empty slices omitted by the writer) stay background.
    in_frames = _frame_source_uids(seg)
    wanted = [uid for uid in slice_uids if uid in in_frames]
    mask = np.zeros(volume.shape, dtype=bool)
    if not wanted:
        return mask
    try:
        pixels = seg.get_pixels_by_source_instance(
            wanted, combine_segments=True, skip_overlap_checks=True
        )
    except Exception as exc:
        raise error("label", f"cannot map DICOM-SEG {path.name} onto the series: {exc}") from exc
    if pixels.shape[1:3] != volume.shape[1:]:
        raise error(
            "label",
            f"DICOM-SEG {path.name} frames are {list(pixels.shape[1:3])}, "
            f"the image's slices {list(volume.shape[1:])}",
        )
    position = {uid: k for k, uid in enumerate(slice_uids)}
    for row, uid in enumerate(wanted):
        mask[position[uid]] = pixels[row] != 0
    return mask


def _frame_source_uids(seg: Any) -> set[str]:
    uids: set[str] = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uids.add(str(source.ReferencedSOPInstanceUID))
    return uids


def stratified_folds(strata: Sequence[str], k: int, seed: int) -> list[list[int]]:
    """Split case indices into ``k`` disjoint folds, each stratum spread evenly over them.

    Within each stratum (in sorted order) the cases are shuffled with ``seed`` and dealt
    round-robin, continuing where the previous stratum stopped, so fold sizes differ by at
    most one and each stratum's counts per fold differ by at most one. Deterministic.
    """
    if k < 2:
        raise ValueError(f"folds must be at least 2, got {k}")
    if k > len(strata):
        raise ValueError(f"cannot make {k} folds from {len(strata)} cases")
    folds: list[list[int]] = [[] for _ in range(k)]
    next_fold = 0
    for stratum in sorted(set(strata)):
        members = np.array([i for i, s in enumerate(strata) if s == stratum])
        word = int.from_bytes(hashlib.sha256(stratum.encode()).digest()[:4], "big")
        np.random.default_rng([seed, word]).shuffle(members)
        for i in members:
            folds[next_fold].append(int(i))
            next_fold = (next_fold + 1) % k
    return [sorted(f) for f in folds]


def fold_summary(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and (population) standard deviation over the folds that have a value."""
    present = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return {
        "mean": round(float(np.mean(present)), 4) if present else None,
        "std": round(float(np.std(present)), 4) if present else None,
        "per_fold": [None if v is None else round(float(v), 4) for v in values],
    }
