"""Prompt data for PAPO: shards, reading, prompt encoding, image masking and the synthetic task.

Modules, one idea each:
- ``config``: ``DataConfig``, ``MaskingConfig``, ``SyntheticConfig`` (the ``data`` section of the config).
- ``shard_format``: the on-disk sample layout inside a webdataset ``.tar`` shard.
- ``manifest``: the shard list with per-shard sample counts (``manifest.json``), or a count by scanning.
- ``shard_writer``: rolling, atomic ``.tar`` shard writer that keeps a manifest.
- ``rows``: JSONL / Parquet rows (image paths or bytes) -> shard samples (used by ``tools/make_shards.py``).
- ``records``: one raw tar sample -> ``PromptSample`` (validated, images decoded), with errors naming
  the shard and the sample key.
- ``order``: the seed-determined per-epoch order and its split across data-parallel ranks and workers.
- ``reader``: ``PromptLoader`` streams ``EncodedPrompt`` per DP rank, resumable from a small state dict.
- ``encode``: ``encode_prompt``: chat template, Qwen2-VL image preprocessing, image-pad expansion.
- ``masking``: ``ImageMasker``: PAPO's masked images (raw-grid, patch, noise, precomputed), seeded.
- ``synthetic``: the vision-dependent synthetic task (shapes, colors, positions) with exact answers.
"""
