"""Annotation geometry (image pixels) and file formats; never imports Streamlit or the database."""

from .geometry import Box, Mask, Point, Polygon, boxes_to_mask, mask_bounds, mask_to_boxes

__all__ = ["Box", "Mask", "Point", "Polygon", "boxes_to_mask", "mask_bounds", "mask_to_boxes"]
