"""tools/make_shards.py: JSONL / Parquet rows (paths, bytes, data URIs, HF image dicts, multi-image) ->
webdataset shards at a target size with a manifest of counts; atomic output; bad rows named or counted."""

import base64
import json
import os
import tarfile

import pytest
from data_helpers import make_shards, png_bytes, random_image, read_samples, write_rows
from PIL import Image

from megatron_papo.data.manifest import load_manifest


def _tar_members(path: str) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_jsonl_rows_to_shards_of_the_target_size(tmp_path):
    rows = write_rows(str(tmp_path), 23)
    manifest_path = make_shards.main([rows, "--out", str(tmp_path / "out"), "--shard-size", "12KB"])
    body = json.loads(open(manifest_path).read())
    manifest = load_manifest(manifest_path)
    assert body["num_samples"] == manifest.num_samples == 23 and body["rows_skipped"] == 0
    assert len(manifest.shards) > 2
    for shard in manifest.shards:
        assert shard.num_bytes == os.path.getsize(shard.path)
        assert len({name.split(".")[0] for name in _tar_members(shard.path)}) == shard.num_samples
        assert shard.num_samples == 1 or shard.num_bytes <= (12 << 10) + 1024  # + the tar's end blocks
    names = ["manifest.json"] + [f"shard-{i:06d}.tar" for i in range(len(manifest.shards))]
    assert sorted(os.listdir(tmp_path / "out")) == names

    samples = read_samples(manifest_path)
    assert [s.uid for s in samples] == [f"q{i}" for i in range(23)]
    for i, (sample, line) in enumerate(zip(samples, open(rows).read().splitlines(), strict=True)):
        row = json.loads(line)
        assert (sample.prompt, sample.answer, sample.answer_type) == (row["prompt"], str(i), "math")
        assert len(sample.images) == len(row["images"]) == (2 if i % 5 == 0 else 1)
        for image, name in zip(sample.images, row["images"], strict=True):
            with Image.open(tmp_path / name) as source:
                assert image.tobytes() == source.convert("RGB").tobytes()


def test_parquet_rows_with_bytes_uris_and_labels(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    images = [png_bytes(random_image((40, 30), seed=i)) for i in range(3)]
    random_image((50, 28), seed=9).save(tmp_path / "a.jpg", quality=90)
    hf_rows = pa.table(  # the Hugging Face image feature: {"bytes", "path"} structs
        {
            "qid": ["v0", "v1"],
            "question": ["<image> Which? (A) red (B) blue", "Sum of <image> and <image>?"],
            "answer": ["B", "\\frac{1}{2}"],
            "answer_type": ["choice", None],
            "image": [
                [{"bytes": images[0], "path": None}],
                [{"bytes": images[1], "path": None}, {"bytes": None, "path": "a.jpg"}],
            ],
            "vision_dependent": [True, False],
        }
    )
    uri_rows = pa.table(  # plain strings: a data: URI and a path
        {
            "qid": ["v2"],
            "question": ["x?"],
            "answer": ["7"],
            "image": [["data:image/png;base64," + base64.b64encode(images[2]).decode(), "a.jpg"]],
        }
    )
    pq.write_table(hf_rows, tmp_path / "hf.parquet")
    pq.write_table(uri_rows, tmp_path / "uri.parquet")
    inputs = [str(tmp_path / "hf.parquet"), str(tmp_path / "uri.parquet")]
    manifest_path = make_shards.main(
        inputs + ["--out", str(tmp_path / "out"), "--virl39k", "--source", "virl"]
    )

    samples = read_samples(manifest_path)
    assert [s.uid for s in samples] == ["v0", "v1", "v2"]
    assert [s.answer for s in samples] == ["B", "\\frac{1}{2}", "7"]
    assert [s.answer_type for s in samples] == ["choice", "math", "math"]
    assert [s.vision_dependent for s in samples] == [True, False, None]
    assert {s.source for s in samples} == {"virl"}
    assert [len(s.images) for s in samples] == [1, 2, 2]
    for i, image in enumerate([samples[0].images[0], samples[1].images[0], samples[2].images[0]]):
        assert image.tobytes() == random_image((40, 30), seed=i).tobytes()
    assert samples[1].images[1].size == samples[2].images[1].size == (50, 28)
    members = _tar_members(load_manifest(manifest_path).shards[0].path)
    assert {"000000001.img0.png", "000000001.img1.jpg", "000000002.img1.jpg"} <= set(members)


def test_same_rows_give_byte_identical_shards(tmp_path):
    rows = write_rows(str(tmp_path), 6)
    first = make_shards.main([rows, "--out", str(tmp_path / "a"), "--max-samples", "4"])
    second = make_shards.main([rows, "--out", str(tmp_path / "b"), "--max-samples", "4"])
    shards = [load_manifest(m).shards for m in (first, second)]
    assert [s.num_samples for s in shards[0]] == [4, 2]
    for a, b in zip(*shards, strict=True):
        assert open(a.path, "rb").read() == open(b.path, "rb").read()


def test_a_bad_row_publishes_nothing_or_is_counted_when_skipping(tmp_path, caplog):
    rows = write_rows(str(tmp_path), 9)
    lines = open(rows).read().splitlines()
    lines[6] = json.dumps({"id": "q6", "prompt": "p", "answer": "1", "images": ["images/missing.png"]})
    open(rows, "w").write("\n".join(lines) + "\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"rows\.jsonl:line 7: cannot read image file .*missing\.png"):
        make_shards.main([rows, "--out", str(out), "--max-samples", "2"])
    # rows 0-3 filled two shards, which stay; the open one (rows 4, 5) is gone; no manifest: no data set
    assert sorted(os.listdir(out)) == [f"shard-{i:06d}.tar" for i in range(2)]
    with pytest.raises(SystemExit, match="already holds a data set"):
        make_shards.main([rows, "--out", str(out)])

    manifest_path = make_shards.main([rows, "--out", str(out), "--overwrite", "--skip-bad"])
    assert json.loads(open(manifest_path).read())["rows_skipped"] == 1
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-000000.tar"]  # the old second shard is gone
    assert [s.uid for s in read_samples(manifest_path)] == [f"q{i}" for i in range(9) if i != 6]
    assert "line 7" in caplog.text and "1 skipped so far" in caplog.text


_IMAGE = {"images": ["images/0_0.png"]}


@pytest.mark.parametrize(
    "row, message",
    [
        ({"prompt": "p", "answer": "1", **_IMAGE}, "missing column 'id'"),
        ({"id": "x", "prompt": "p", "answer": "1", "images": []}, "no images"),
        ({"id": "x", "prompt": " ", "answer": "1", **_IMAGE}, "'prompt' must be a non-empty"),
        ({"id": "x", "prompt": "p", "answer": "1", "images": ["rows.jsonl"]}, "image 0: not a decodable"),
        ({"id": "x", "prompt": "p", "answer": "1", "answer_type": "free", **_IMAGE}, "answer_type 'free'"),
        (
            {"id": "x", "prompt": "p", "answer": "1", "vision_dependent": "yes", **_IMAGE},
            "'vision_dependent' must be true, false or null",
        ),
    ],
)
def test_bad_rows_are_named(tmp_path, row, message):
    rows = write_rows(str(tmp_path), 1)
    with open(rows, "a") as f:
        f.write(json.dumps(row) + "\n")
    with pytest.raises(SystemExit, match=f"rows.jsonl:line 2: .*{message}"):
        make_shards.main([rows, "--out", str(tmp_path / "out")])
    assert not os.path.exists(tmp_path / "out" / "manifest.json")


def test_non_utf8_row_file_is_named(tmp_path):
    rows = write_rows(str(tmp_path), 2)
    with open(rows, "ab") as f:
        f.write(b'{"id": "\xff"}\n')
    with pytest.raises(SystemExit, match=r"rows\.jsonl:line 3: not valid UTF-8"):
        make_shards.main([rows, "--out", str(tmp_path / "out")])


def test_shard_size_parsing():
    assert make_shards.parse_size("256MB") == 256 << 20
    assert make_shards.parse_size("1.5k") == 1536 and make_shards.parse_size("1000") == 1000
    with pytest.raises(Exception, match="not a size"):
        make_shards.parse_size("big")
