"""Image-guided refinement of segmentation masks at the acquired resolution.

A whole-volume network runs on a grid two to four times coarser than the acquisition; its
probabilities, trilinearly resampled, give borders that are smooth where the image has a
sharp edge (a thin subdural crescent, a nodule beside a vessel). When the finding's values are
known in modality units (:class:`~triage_node.detectors.manifest.RefineSpec`), the border is
redrawn on the image itself:

1. the search region is the mask dilated by ``dilate_voxels`` in plane and by one slice
   along z (slices are often thicker than pixels are wide);
2. inside it, voxels whose value is in [``min_value``, ``max_value``] are candidates; the
   candidate components that touch the network's mask are kept (others — a neighbouring
   vessel, the skull — are not);
3. holes are filled slice by slice, then an in-plane opening of radius ``open_voxels``
   removes thin attachments (vessel stubs on a nodule), keeping the pieces that touch the
   network's mask;
4. if nothing is left (a finding fainter than the range, e.g. an isodense bleed), the
   network's own mask is kept: refinement never deletes a finding.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from triage_node.detectors.manifest import RefineSpec

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return (yy**2 + xx**2) <= radius * radius


def _search_structure(radius: int) -> np.ndarray:
    """In-plane disk of ``radius``, plus the centre voxel one slice above and below."""
    st = np.zeros((3, 2 * radius + 1, 2 * radius + 1), dtype=bool)
    st[1] = _disk(radius)
    st[0, radius, radius] = st[2, radius, radius] = True
    return st


def grow_box(
    box: tuple[slice, slice, slice], spec: RefineSpec, shape: tuple[int, ...]
) -> tuple[slice, slice, slice]:
    """``box`` grown by the search margin (one slice, ``dilate_voxels`` pixels), clipped."""
    margin = (1, spec.dilate_voxels, spec.dilate_voxels)
    z, y, x = (
        slice(max(s.start - m, 0), min(s.stop + m, n))
        for s, m, n in zip(box, margin, shape, strict=True)
    )
    return z, y, x


def refine_mask(mask: np.ndarray, values: np.ndarray, spec: RefineSpec) -> np.ndarray:
    """The refined mask (same shape as ``mask``; ``values`` in modality units, z, y, x).

    Works inside the bounding box of ``mask`` grown by the search radius, so its cost
    follows the finding's size, not the volume's.
    """
    if not mask.any():
        return mask
    (found,) = ndimage.find_objects(mask.astype(np.uint8))
    box = grow_box(found, spec, mask.shape)
    local = mask[box]
    region = (
        ndimage.binary_dilation(local, structure=_search_structure(spec.dilate_voxels))
        if spec.dilate_voxels
        else local.copy()
    )
    image = values[box]
    region &= image >= spec.min_value
    if spec.max_value is not None:
        region &= image <= spec.max_value
    labels, _ = ndimage.label(region, structure=_CONNECTIVITY)
    touching = np.unique(labels[local & region])
    touching = touching[touching > 0]
    if touching.size == 0:
        return mask
    refined = np.isin(labels, touching)
    for z in range(refined.shape[0]):
        refined[z] = ndimage.binary_fill_holes(refined[z])
    if spec.open_voxels:
        opened = ndimage.binary_opening(refined, structure=_disk(spec.open_voxels)[None])
        pieces, _ = ndimage.label(opened, structure=_CONNECTIVITY)
        kept = np.unique(pieces[local & opened])
        kept = kept[kept > 0]
        if kept.size:  # a finding thinner than the opening keeps its unopened border
            refined = np.isin(pieces, kept)
    out = np.zeros_like(mask)
    out[box] = refined
    return out


def refine_in_box(
    local: np.ndarray, box: tuple[slice, slice, slice], values: np.ndarray, spec: RefineSpec
) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """:func:`refine_mask` of a mask ``local`` that covers ``box`` of the volume ``values``:
    the refined mask and the box (grown by the search margin) it now covers."""
    grown = grow_box(box, spec, values.shape)
    padded = np.zeros(tuple(s.stop - s.start for s in grown), dtype=bool)
    padded[tuple(slice(a.start - b.start, a.stop - b.start)
                 for a, b in zip(box, grown, strict=True))] = local
    return refine_mask(padded, values[grown], spec), grown
