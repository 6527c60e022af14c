"""Checking the vision tower's inputs: pixel values against image grids."""

from __future__ import annotations

import torch


def check_inputs(pixel_values: torch.Tensor, grid_thw: torch.Tensor, patch_dim: int, merge_size: int) -> None:
    """Raise ``ValueError`` unless ``pixel_values`` is [patches, ``patch_dim``] with the patches of
    ``grid_thw`` [images, 3], every grid's height and width a multiple of ``merge_size``."""
    if pixel_values.dim() != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values must be [patches, {patch_dim}], got {tuple(pixel_values.shape)}")
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [images, 3] (t, h, w), got {tuple(grid_thw.shape)}")
    patches = int(grid_thw.prod(-1).sum())
    if patches != pixel_values.shape[0]:
        raise ValueError(
            f"image grids {grid_thw.tolist()} describe {patches} patches, "
            f"pixel_values has {pixel_values.shape[0]}"
        )
    if bool((grid_thw[:, 1:] % merge_size).any()):
        raise ValueError(
            f"image grids {grid_thw.tolist()}: heights and widths must be multiples of the "
            f"spatial merge size {merge_size}"
        )
