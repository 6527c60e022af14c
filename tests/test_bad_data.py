"""Bad data cannot stall or flood a run: with ``data.skip_bad_samples`` an all-bad data set or too many bad
samples in a row stop it with a clear error; oversized images are refused before decoding; malformed JSON
lines are bad rows that ``tools/make_shards.py --skip-bad`` skips."""

import json

import pytest
from data_helpers import make_shards, tiny_processor_dir, write_rows
from PIL import ImageFile
from test_data_reader import _loader, _members, _with_json, _write_tar
from transformers import AutoImageProcessor, AutoTokenizer

from megatron_papo.data.records import BadSampleError, DataError


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """``test_data_reader``'s loader environment without its data set (each test brings its shard)."""
    hf = tiny_processor_dir(str(tmp_path_factory.mktemp("hf")))
    return None, AutoTokenizer.from_pretrained(hf), AutoImageProcessor.from_pretrained(hf)


def _shard(tmp_path, bad: set[int], count: int = 6) -> str:
    """A shard of ``count`` samples ``g<i>``, those in ``bad`` without an answer."""
    samples = [_with_json(_members(i), answer=None) if i in bad else _members(i) for i in range(count)]
    return _write_tar(str(tmp_path / "shard.tar"), samples)


@pytest.mark.timeout(60)
def test_all_bad_data_is_an_error_not_an_endless_loop(env, tmp_path):
    shard = _shard(tmp_path, bad=set(range(6)))
    loader = _loader(env, shard, dp_size=1, skip_bad_samples=True)
    with pytest.raises(DataError, match=f"{shard}: all 6 samples of data-parallel rank 0's epoch are bad; "):
        next(iter(loader))
    assert loader.skipped == 6


@pytest.mark.timeout(60)
def test_too_many_bad_samples_in_a_row_stop_the_run(env, tmp_path):
    shard = _shard(tmp_path, bad={1, 2, 3})
    uids = [p.uid for p in _loader(env, shard, dp_size=1, repeat=False, shuffle=False, skip_bad_samples=True)]
    assert uids == ["g0", "g4", "g5"]  # under the limit: skipped
    loader = _loader(
        env, shard, dp_size=1, shuffle=False, skip_bad_samples=True, max_consecutive_bad_samples=3
    )
    with pytest.raises(DataError, match=r"3 bad samples in a row \(data.max_consecutive_bad_samples\); the "):
        [p.uid for p in loader]


def test_an_image_over_max_image_pixels_is_refused_before_decoding(env, tmp_path, monkeypatch):
    shard = _write_tar(str(tmp_path / "big.tar"), [_members(i) for i in range(2)])  # 30 x 30 images

    def no_decoding(image):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    expected = f"shard {shard}, sample 000000000: img0.png is 30x30 = 900 pixels, more than "
    expected += "data.max_image_pixels=899"
    with pytest.raises(BadSampleError, match=expected):
        list(_loader(env, shard, dp_size=1, repeat=False, shuffle=False, max_image_pixels=899))
    with pytest.raises(ValueError, match="data.max_image_pixels must be >= 1"):
        _loader(env, shard, max_image_pixels=0)


def test_make_shards_skips_malformed_json_lines(tmp_path):
    rows = write_rows(str(tmp_path), 3)
    with open(rows, "a", encoding="utf-8") as f:
        f.write('{"id": "q9", "prompt": \n[1, 2]\n')
    with pytest.raises(SystemExit, match=r"rows\.jsonl:line 4: not valid JSON"):
        make_shards.main([rows, "--out", str(tmp_path / "strict")])
    manifest = make_shards.main([rows, "--out", str(tmp_path / "shards"), "--skip-bad"])
    body = json.loads(open(manifest).read())
    assert body["num_samples"] == 3 and body["rows_skipped"] == 2
