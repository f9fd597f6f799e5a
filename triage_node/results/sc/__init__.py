"""Heatmap results as Secondary Capture images (PS3.3 A.8.1)."""

from triage_node.results.sc.heatmap import HeatmapEncoder, blend_heatmap, grey_image

__all__ = ["HeatmapEncoder", "blend_heatmap", "grey_image"]
