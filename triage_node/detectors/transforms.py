"""Detector preprocessing: a MONAI ``Compose`` built from a manifest's allow-listed steps.

A detector is data: its manifest lists the preprocessing steps by MONAI class name and
arguments. Only names on :data:`ALLOWED_TRANSFORMS` are accepted, so a manifest can never make
the node import or run arbitrary code. ``trainers`` builds its training inputs with these same
functions from the same list it writes into the manifest, so training and serving see the same
pixels (train–serve consistency).

Spatial steps are limited to ``Resize`` of the whole field of view, because the node maps the
network's output back onto the acquired grid by inverting exactly that geometry (half-voxel
centred, as ``torch.nn.functional.interpolate`` with ``align_corners=False``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from monai.transforms import (
    Compose,
    NormalizeIntensity,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRangePercentiles,
    ThresholdIntensity,
)
from monai.utils import convert_to_numpy

from triage_node.detectors.manifest import TransformSpec
from triage_node.errors import ConfigError


@dataclass(frozen=True)
class AllowedTransform:
    """An allow-listed MONAI array transform and how it applies to label masks."""

    factory: Callable[..., Callable[[Any], Any]]
    spatial: bool
    """Spatial steps also apply to label masks; intensity steps do not."""
    label_args: Mapping[str, Any] = field(default_factory=dict)
    """Arguments that replace the image's when the step is applied to a label mask."""
    forbidden_args: Mapping[str, Any] = field(default_factory=dict)
    """Argument values the node cannot invert or honour, with the reason."""


ALLOWED_TRANSFORMS: Mapping[str, AllowedTransform] = {
    # Area averaging gives soft label occupancies in [0, 1] that the network learns to
    # reproduce, so thresholding its probabilities at 0.5 keeps volumes unbiased.
    "Resize": AllowedTransform(
        Resize,
        spatial=True,
        label_args={"mode": "area", "anti_aliasing": False},
        forbidden_args={
            "align_corners": (True, "the node maps outputs back with align_corners=False"),
            "size_mode": ("longest", "the node maps outputs back over the whole field of view"),
            "lazy": (True, "lazy resampling is not supported"),
        },
    ),
    "ScaleIntensityRange": AllowedTransform(ScaleIntensityRange, spatial=False),
    # Radiographs: stored values depend on bit depth (12/14/16), detector and processing, so
    # the window comes from the image's own percentiles.
    "ScaleIntensityRangePercentiles": AllowedTransform(
        ScaleIntensityRangePercentiles, spatial=False
    ),
    "ThresholdIntensity": AllowedTransform(ThresholdIntensity, spatial=False),
    "NormalizeIntensity": AllowedTransform(NormalizeIntensity, spatial=False),
}


def _allowed(spec: TransformSpec) -> AllowedTransform:
    allowed = ALLOWED_TRANSFORMS.get(spec.name)
    if allowed is None:
        raise ConfigError(
            f"preprocessing transform {spec.name!r} is not allowed; "
            f"allowed: {', '.join(sorted(ALLOWED_TRANSFORMS))}"
        )
    return allowed


def _instantiate(spec: TransformSpec, args: Mapping[str, Any]) -> Callable[[Any], Any]:
    allowed = _allowed(spec)
    for key, (bad_value, reason) in allowed.forbidden_args.items():
        if key in args and args[key] == bad_value:
            raise ConfigError(
                f"preprocessing transform {spec.name!r}: {key}={bad_value!r} is not supported "
                f"({reason})"
            )
    try:
        return allowed.factory(**args)
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"preprocessing transform {spec.name!r}: invalid arguments {dict(args)!r}: {exc}"
        ) from exc


def _compose(steps: list[Callable[[Any], Any]]) -> Compose:
    # log_stats off: MONAI's statistics logging can print data (and tags) we never want in logs.
    return Compose(steps, map_items=False, log_stats=False)


def build_preprocessing(specs: Sequence[TransformSpec]) -> Compose:
    """The image preprocessing ``Compose`` of a manifest.

    It takes a channel-first float32 array ``[1, z, y, x]`` of modality values (HU for CT)
    and returns the network input ``[1, *input.shape]``; see :func:`apply_preprocessing`.

    Raises:
        ConfigError: a step is not on the allow-list, or its arguments are invalid; the
            message names the transform.
    """
    return _compose([_instantiate(spec, spec.args) for spec in specs])


def build_label_preprocessing(specs: Sequence[TransformSpec]) -> Compose:
    """The matching label-mask ``Compose``: the spatial steps only, with label arguments.

    Training applies it to the ground-truth mask so that targets line up voxel for voxel
    with the preprocessed image.
    """
    steps: list[Callable[[Any], Any]] = []
    for spec in specs:
        allowed = _allowed(spec)
        if allowed.spatial:
            steps.append(_instantiate(spec, {**spec.args, **allowed.label_args}))
    return _compose(steps)


def apply_preprocessing(compose: Compose, array: np.ndarray) -> np.ndarray:
    """Run ``compose`` on a [z, y, x] array; returns float32 numpy ``[1, z', y', x']``."""
    if array.ndim != 3:
        raise ValueError(f"expected a [z, y, x] volume, got an array of shape {array.shape}")
    channel_first = np.ascontiguousarray(array, dtype=np.float32)[None]
    with torch.inference_mode():
        out = compose(channel_first)
    result = convert_to_numpy(out, dtype=np.float32)
    return np.ascontiguousarray(result)


def resize_target_shape(specs: Sequence[TransformSpec]) -> tuple[int, int, int] | None:
    """The spatial size set by the last ``Resize`` step, or None when there is none."""
    size: tuple[int, int, int] | None = None
    for spec in specs:
        if spec.name == "Resize":
            raw = spec.args.get("spatial_size")
            if not isinstance(raw, Sequence) or len(raw) != 3:
                raise ConfigError(
                    f"preprocessing transform 'Resize': spatial_size must be three sizes "
                    f"(z, y, x), got {raw!r}"
                )
            size = (int(raw[0]), int(raw[1]), int(raw[2]))
    return size
