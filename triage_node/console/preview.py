"""Pictures of the node's results, drawn from its own files (the console, ``viewer_check``).

* a SEG is drawn on a source slice: the slice windowed to grey as a viewer shows it
  (:func:`triage_node.results.sc.grey_image`), every segment tinted and outlined in its own
  colour; the *key slice* is the source slice holding the most segment pixels;
* a heatmap Secondary Capture is already a picture (RGB, drawn by the node): shown as is.

PNG only, no text burned in: a preview shows pixels, never patient attributes.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset
from scipy import ndimage

from triage_node.errors import TriageError
from triage_node.results.sc import grey_image
from triage_node.state.db import Database

__all__ = [
    "PALETTE",
    "PreviewUnavailable",
    "ResultPreview",
    "ResultPreviews",
    "frame_sources",
    "grey_rgb",
    "overlay_segments",
    "png_bytes",
    "seg_masks_by_source",
    "segment_colours",
]

PALETTE: list[tuple[int, int, int]] = [
    (255, 64, 64), (64, 200, 255), (255, 210, 0), (120, 255, 120), (230, 120, 255)]
TINT = 0.35
"""Opacity of a segment's tint; its 2-pixel outline is opaque."""


class PreviewUnavailable(TriageError):
    """No picture can be drawn (unknown preview, result or source file gone)."""


def grey_rgb(source: Dataset) -> np.ndarray:
    """``source`` windowed to grey as a viewer shows it, as uint8 RGB [rows, cols, 3]."""
    grey = np.rint(grey_image(source, np.zeros((1, 1))) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def segment_colours(seg: Dataset) -> dict[int, tuple[int, int, int]]:
    """A palette colour per Segment Number, in Segment Sequence order."""
    return {int(item.SegmentNumber): PALETTE[i % len(PALETTE)]
            for i, item in enumerate(seg.SegmentSequence)}


def frame_sources(seg: Dataset) -> list[tuple[str, int]]:
    """(source SOP Instance UID, segment number) of every SEG frame (PS3.3 C.8.20.3)."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    shared_segment = (
        int(shared.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        if "SegmentIdentificationSequence" in shared else None
    )
    frames: list[tuple[str, int]] = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        number = (
            int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            if "SegmentIdentificationSequence" in item else shared_segment
        )
        if number is None:
            raise ValueError("SEG frame without a segment number")
        frames.append((str(source.ReferencedSOPInstanceUID), number))
    return frames


def seg_masks_by_source(seg: Dataset) -> dict[str, list[tuple[int, np.ndarray]]]:
    """Per source instance, its (segment number, boolean mask) pairs; the source slices with
    the most segment pixels first."""
    pixels = seg.pixel_array.reshape(int(seg.NumberOfFrames), int(seg.Rows), int(seg.Columns))
    by_source: dict[str, list[tuple[int, np.ndarray]]] = {}
    for (uid, number), frame in zip(frame_sources(seg), pixels, strict=True):
        by_source.setdefault(uid, []).append((number, frame.astype(bool)))
    ranked = sorted(by_source, key=lambda u: -sum(int(m.sum()) for _, m in by_source[u]))
    return {uid: by_source[uid] for uid in ranked}


def overlay_segments(source: Dataset, masks: list[tuple[int, np.ndarray]],
                     colours: dict[int, tuple[int, int, int]]) -> np.ndarray:
    """``source`` in grey with each mask tinted and outlined: uint8 RGB [rows, cols, 3]."""
    rgb = grey_rgb(source).astype(np.float32)
    for number, mask in masks:
        colour = np.asarray(colours.get(number, PALETTE[0]), dtype=np.float32)
        rgb[mask] = rgb[mask] * (1 - TINT) + colour * TINT
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        rgb[edge] = colour
    return np.asarray(np.clip(np.rint(rgb), 0, 255), dtype=np.uint8)


def thumbnail(rgb: np.ndarray, size: int) -> Image.Image:
    """``rgb`` as a PIL image no larger than ``size`` on its longer side (never enlarged)."""
    image = Image.fromarray(np.asarray(rgb, dtype=np.uint8))
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def png_bytes(rgb: np.ndarray, size: int) -> bytes:
    buffer = io.BytesIO()
    thumbnail(rgb, size).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


@dataclass(frozen=True)
class ResultPreview:
    """One picture the console can show for a study: a SEG on its key slice, or a heatmap."""

    n: int
    kind: str
    """``SEG`` or ``SC`` (the heatmap)."""
    path: Path
    series_description: str
    labels: list[str]

    def to_dict(self, study_key: str) -> dict[str, Any]:
        what = ("segmentation overlay on the key slice" if self.kind == "SEG"
                else "heatmap over the image")
        labels = ", ".join(self.labels)
        return {"n": self.n, "kind": self.kind, "series_description": self.series_description,
                "labels": self.labels,
                "caption": f"{self.series_description or self.kind}: {what}"
                           + (f" ({labels})" if labels else ""),
                "url": f"/api/studies/{study_key}/preview/{self.n}.png"}


class ResultPreviews:
    """Previews of a study's results, from the node's result files and spool.

    Rendering reads the SEG's pixels and one source slice; the PNGs are kept in a small
    in-memory cache (results are immutable once written: a re-run writes new files)."""

    def __init__(self, db: Database, results_root: Path, spool_root: Path, *,
                 cache_size: int = 32) -> None:
        self.db = db
        self.results_root = results_root
        self.spool_root = spool_root
        self._cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def for_study(self, study_uid: str) -> list[ResultPreview]:
        """The study's SEG and heatmap SC results, one per SOP instance, in outbox order."""
        rows = self.db.query(
            "SELECT sop_instance_uid, kind, path FROM outbox WHERE study_uid=?"
            " AND kind IN ('SEG', 'SC') ORDER BY kind DESC, id", (study_uid,))
        seen: set[str] = set()
        previews: list[ResultPreview] = []
        for r in rows:
            if r["sop_instance_uid"] in seen:
                continue  # the same object queued for several destinations
            seen.add(r["sop_instance_uid"])
            path = self.results_root / r["path"]
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError):
                continue
            labels = [str(s.get("SegmentLabel", "")) for s in header.get("SegmentSequence", [])]
            previews.append(ResultPreview(len(previews), str(r["kind"]), path,
                                          str(header.get("SeriesDescription", "")), labels))
        return previews

    def png(self, study_uid: str, n: int, size: int = 512) -> bytes:
        """Preview ``n`` of the study as PNG bytes (longer side at most ``size``)."""
        previews = self.for_study(study_uid)
        if not 0 <= n < len(previews):
            raise PreviewUnavailable(f"the study has no preview {n}")
        preview = previews[n]
        key = (str(preview.path), preview.path.stat().st_mtime_ns, size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = png_bytes(self._render(preview), size)
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return data

    def _render(self, preview: ResultPreview) -> np.ndarray:
        ds = pydicom.dcmread(preview.path)
        if preview.kind != "SEG":
            return np.asarray(ds.pixel_array)
        by_source = seg_masks_by_source(ds)
        paths = self._spool_paths(list(by_source))
        key_uid = next((uid for uid in by_source if uid in paths), None)
        if key_uid is None:
            raise PreviewUnavailable("the SEG's source images are no longer in the spool")
        source = pydicom.dcmread(paths[key_uid])
        return overlay_segments(source, by_source[key_uid], segment_colours(ds))

    def _spool_paths(self, sop_uids: list[str]) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for start in range(0, len(sop_uids), 500):
            chunk = sop_uids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for r in self.db.query(f"SELECT sop_instance_uid, path FROM instances"
                                   f" WHERE sop_instance_uid IN ({marks})", tuple(chunk)):
                path = self.spool_root / r["path"]
                if path.is_file():
                    found[r["sop_instance_uid"]] = path
        return found
