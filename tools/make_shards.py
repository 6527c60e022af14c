"""JSONL / Parquet rows with images -> webdataset ``.tar`` shards and a ``manifest.json`` with counts.

    python tools/make_shards.py train.jsonl --out data/train --shard-size 256MB
    python tools/make_shards.py virl39k.parquet --out data/virl --virl39k --source virl39k
    python tools/make_shards.py a.jsonl b.parquet --out data/mix --image-root images/ --skip-bad

A row holds an id, a prompt, an answer and its image(s): file paths (relative to ``--image-root``, else to
the row file's folder), raw bytes, ``data:`` URIs or ``{"bytes", "path"}`` dicts, alone or in a list.
Optional columns: answer type (math / choice / exact), source, vision-dependency label, reference
solution, precomputed masked images. Each shard is renamed into place when complete and the manifest is
written last, so the output holds a manifest only when every shard is complete. A bad row stops the run
naming its file and line (nothing published), or with ``--skip-bad`` is logged and counted in the
manifest (``rows_skipped``). See ``megatron_papo.data.rows``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys

from megatron_papo.data.records import DataError
from megatron_papo.data.rows import RowSchema, convert_rows
from megatron_papo.data.shard_format import ANSWER_TYPES
from megatron_papo.data.shard_writer import ShardWriter

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", re.IGNORECASE)
VIRL39K = RowSchema(id_key="qid", prompt_key="question", images_key="image")


def parse_size(text: str) -> int:
    """``"256MB"`` / ``"64K"`` / ``"1000"`` -> bytes (powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MB, 64KB, 1000)")
    number, unit = match.groups()
    return int(float(number) * 1024 ** " KMG".index(unit.upper() or " "))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("inputs", nargs="+", help=".jsonl or .parquet row files")
    parser.add_argument("--out", required=True, help="output folder (shards and manifest.json)")
    parser.add_argument("--prefix", default="shard", help="shard file prefix: PREFIX-000000.tar")
    parser.add_argument("--shard-size", type=parse_size, default="256MB", help="target bytes per shard")
    parser.add_argument("--max-samples", type=int, help="at most this many samples per shard")
    parser.add_argument("--image-root", help="folder image paths are relative to (default: the row file's)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data set already in --out")
    parser.add_argument("--skip-bad", action="store_true", help="log and count bad rows instead of failing")
    parser.add_argument("--virl39k", action="store_true", help="ViRL39K columns: qid, question, image")
    parser.add_argument("--answer-type", choices=ANSWER_TYPES, help="answer type of rows without one")
    parser.add_argument("--source", help="source name of rows without one")
    for field in dataclasses.fields(RowSchema):
        if field.name.endswith("_key"):
            flag = "--" + field.name.replace("_", "-")
            parser.add_argument(flag, dest=field.name, help=f"column name (default: {field.default})")
    return parser.parse_args(argv)


def schema_from_args(args: argparse.Namespace) -> RowSchema:
    """The row schema: the defaults (or ViRL39K's), with the columns and defaults given on the line."""
    schema = VIRL39K if args.virl39k else RowSchema()
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(RowSchema) if f.name.endswith("_key")}
    given["default_answer_type"], given["default_source"] = args.answer_type, args.source
    return dataclasses.replace(schema, **{k: v for k, v in given.items() if v is not None})


def main(argv: list[str] | None = None) -> str:
    """Write the shards; return the manifest's path (prints it with the counts)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        writer = ShardWriter(
            args.out, args.prefix, args.shard_size, args.max_samples, args.overwrite, {"inputs": args.inputs}
        )
        manifest, skipped = convert_rows(
            args.inputs, writer, schema_from_args(args), args.image_root, args.skip_bad
        )
    except (DataError, ValueError) as e:
        raise SystemExit(f"make_shards: {e}") from e
    with open(manifest, encoding="utf-8") as f:
        body = json.load(f)
    count, shards = body["num_samples"], len(body["shards"])
    print(f"wrote {count} samples in {shards} shards ({skipped} rows skipped): {manifest}")
    return manifest


if __name__ == "__main__":
    main(sys.argv[1:])
