"""The vision special tokens of a Qwen2.5-VL config, and checking that a batch's image placeholder tokens
match its image grids."""

from __future__ import annotations

import torch

# the Qwen2.5-VL config fields of the vision special tokens: image and video placeholders, vision start / end
VISION_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


def check_image_tokens(
    input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int, merge_size: int
) -> None:
    """Raise ``ValueError`` naming the sample and image unless every run of ``image_token_id`` in
    ``input_ids`` [b, s] holds exactly the tokens of the next images of ``image_grid_thw`` [images, 3]
    (``t * h * w / merge_size**2`` each; images in row-major order over the batch, as transformers
    fills them) and every image is used."""
    sizes = [] if image_grid_thw is None else (image_grid_thw.prod(-1) // merge_size**2).tolist()
    is_image = torch.nn.functional.pad((input_ids == image_token_id).int(), (1, 1))  # [b, s + 2]
    edges = is_image.diff(dim=-1)  # +1 where a run starts, -1 after it ends (row-major order)
    starts, ends = (edges == 1).nonzero(), (edges == -1).nonzero()
    image = 0
    for (sample, start), (_, end) in zip(starts.tolist(), ends.tolist(), strict=True):
        run = end - start  # tokens of this run not yet matched to an image
        while run > 0:
            if image == len(sizes):
                raise ValueError(
                    f"sample {sample}: {run} image placeholder tokens with no image grid left "
                    f"(the batch has {len(sizes)} images)"
                )
            if sizes[image] > run:
                raise ValueError(
                    f"sample {sample}: a run of {end - start} image placeholder tokens at position {start} "
                    f"ends inside image {image} (grid {image_grid_thw[image].tolist()}: "
                    f"{sizes[image]} tokens)"
                )
            run -= sizes[image]
            image += 1
    if image != len(sizes):
        raise ValueError(
            f"the batch's image placeholder tokens cover {image} images, image_grid_thw has {len(sizes)}"
        )
