"""DICOM Segmentation results (PS3.3 A.51)."""

from triage_node.results.seg.encoder import SegEncoder, algorithm_identification_sequence

__all__ = ["SegEncoder", "algorithm_identification_sequence"]
