"""Per-item JSON lines gathered over data-parallel ranks (``eval.save_items``, ``logging.save_rollouts``)."""

from __future__ import annotations

import json
import os

import torch.distributed as dist
from megatron.core import parallel_state as ps


def write_dp_records(records: list[dict], path: str) -> None:
    """Every DP rank's ``records`` (model-parallel peers hold the same), one JSON line each in DP-rank
    order, written by global rank 0 (a temporary file renamed into place: a reader never sees half)."""
    everyone: list[list[dict]] = [[] for _ in range(ps.get_data_parallel_world_size())]
    dist.all_gather_object(everyone, records, group=ps.get_data_parallel_group())
    if dist.get_rank() != 0:
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for record in (r for part in everyone for r in part):
            f.write(json.dumps(record) + "\n")
    os.replace(path + ".tmp", path)
