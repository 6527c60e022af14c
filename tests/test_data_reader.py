"""PromptLoader over real shards: every sample once per epoch across DP=2 ranks x 2 DataLoader workers, a
seed-determined order that repeats over epochs, exact mid-epoch resume; bad data named or counted."""

import io
import json
import logging
import os
import tarfile

import pytest
from data_helpers import data_config, make_dataset, png_bytes, random_image, tiny_processor_dir
from transformers import AutoImageProcessor, AutoTokenizer

from megatron_papo.data.reader import build_prompt_loader
from megatron_papo.data.records import BadSampleError, DataError
from megatron_papo.data.shard_format import ShardSample, sample_key

NUM_SAMPLES = 22  # shards of 4: 4, 4, 4, 4, 4, 2 (a short last shard)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    hf = tiny_processor_dir(str(root / "hf"))
    manifest = make_dataset(str(root / "data"), NUM_SAMPLES, samples_per_shard=4)
    return manifest, AutoTokenizer.from_pretrained(hf), AutoImageProcessor.from_pretrained(hf)


def _loader(env, source=None, dp_rank=0, dp_size=2, repeat=True, **cfg):
    manifest, tokenizer, processor = env
    return build_prompt_loader(
        source or manifest, data_config(**cfg), tokenizer, processor, dp_rank, dp_size, repeat=repeat
    )


def _take(loader, count: int) -> list:
    out = []
    for prompt in loader:
        out.append(prompt)
        if len(out) == count:
            break
    return out


def _uids(prompts) -> list[str]:
    return [p.uid for p in prompts]


def test_every_sample_once_per_epoch_across_ranks_and_workers(env):
    order = dict(seed=7, shuffle_buffer=6, num_workers=2)
    per_rank = {}
    for rank in (0, 1):
        loader = _loader(env, dp_rank=rank, **order)
        assert loader.samples_per_epoch == NUM_SAMPLES // 2
        per_rank[rank] = _take(loader, 2 * loader.samples_per_epoch + 3)  # two epochs and into a third
    for epoch in (0, 1):
        seen = [p.uid for r in (0, 1) for p in per_rank[r][epoch * 11 : (epoch + 1) * 11]]
        assert sorted(seen) == sorted(f"q{i}" for i in range(NUM_SAMPLES))
        for rank in (0, 1):
            chunk = per_rank[rank][epoch * 11 : (epoch + 1) * 11]
            assert [(p.epoch, p.position) for p in chunk] == [(epoch, i) for i in range(11)]
    first, second = (_uids(per_rank[0][e * 11 : (e + 1) * 11]) for e in (0, 1))
    assert first != second  # each epoch is reshuffled
    for prompt in per_rank[1][:11]:  # the right sample behind each prompt
        assert prompt.answer == prompt.uid[1:] and len(prompt.images) == (
            2 if int(prompt.answer) % 5 == 0 else 1
        )
        assert prompt.pixel_values.shape[0] == int(prompt.image_grid_thw.prod(dim=1).sum())

    # the order is the seed's, whatever the number of workers; another seed gives another order
    assert _uids(_take(_loader(env, dp_rank=0, **{**order, "num_workers": 0}), 25)) == _uids(per_rank[0])
    other = _uids(_take(_loader(env, dp_rank=0, **{**order, "seed": 8}), 11))
    assert other != _uids(per_rank[0][:11])
    unshuffled = _uids(_take(_loader(env, dp_rank=0, shuffle=False), 11))
    assert unshuffled == [f"q{i}" for i in range(11)]


def test_resume_mid_epoch_continues_without_repeats_or_gaps(env):
    order = dict(seed=3, shuffle_buffer=5, num_workers=2)
    reference = _uids(_take(_loader(env, dp_rank=1, **order), 16))
    loader = _loader(env, dp_rank=1, **order)
    head = _take(loader, 7)  # the workers have read ahead; the state counts what was handed out
    state = loader.state_dict()
    assert state["next_index"] == 7
    resumed = _loader(env, dp_rank=1, **order)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON checkpoint
    assert _uids(head) + _uids(_take(resumed, 9)) == reference
    assert resumed.epoch == 1

    for change in ({"seed": 4}, {"shuffle_buffer": 6}):
        with pytest.raises(ValueError, match=f"cannot resume .*{next(iter(change))} was"):
            _loader(env, dp_rank=1, **{**order, **change}).load_state_dict(state)
    with pytest.raises(ValueError, match="dp_rank was 1 when saved, now 0"):
        _loader(env, dp_rank=0, **order).load_state_dict(state)


def test_one_pass_without_repeat(env):
    loader = _loader(env, dp_rank=0, dp_size=3, repeat=False, num_workers=2)
    assert len(_uids(loader)) == loader.samples_per_epoch == 7
    assert list(loader) == []  # the pass is done; the state says so too
    assert loader.state_dict()["next_index"] == 7


# --- bad data: a real shard with one bad sample among good ones ---------------------------------------


def _members(index: int) -> dict[str, bytes]:
    sample = ShardSample(f"g{index}", f"Q{index}?", str(index), [png_bytes(random_image((30, 30), index))])
    return sample.tar_members(sample_key(index))


def _write_tar(path: str, samples: list[dict[str, bytes]]) -> str:
    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for suffix, data in sample.items():
                if suffix != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def _with_json(members: dict[str, bytes], **changes) -> dict[str, bytes]:
    meta = json.loads(members["json"])
    meta.update(changes)
    return {**members, "json": json.dumps({k: v for k, v in meta.items() if v is not None}).encode()}


BAD_SAMPLES = {
    "corrupt image": (lambda m: {**m, "img0.png": m["img0.png"][:60]}, "img0.png is not a decodable image"),
    "missing field": (lambda m: _with_json(m, answer=None), "lacks the field 'answer'"),
    "non-UTF-8 JSON": (lambda m: {**m, "json": m["json"].replace(b'"Q', b'"\xffQ')}, "not valid UTF-8"),
    "bad answer type": (lambda m: _with_json(m, answer_type="free"), "answer_type 'free'"),
}


@pytest.mark.parametrize("case", BAD_SAMPLES)
def test_a_bad_sample_is_named_or_counted(env, tmp_path, caplog, case):
    spoil, reason = BAD_SAMPLES[case]
    samples = [_members(i) for i in range(6)]
    samples[3] = spoil(samples[3])
    shard = _write_tar(str(tmp_path / "bad.tar"), samples)
    expected = f"shard {shard}, sample 000000003: .*{reason}"
    workers = 2 if case == "corrupt image" else 0  # the error crosses the worker process as it is
    with pytest.raises(BadSampleError, match=expected):
        list(_loader(env, shard, dp_size=1, repeat=False, shuffle=False, num_workers=workers))

    loader = _loader(env, shard, dp_size=1, repeat=False, skip_bad_samples=True, num_workers=workers)
    with caplog.at_level(logging.WARNING):
        assert sorted(_uids(loader)) == ["g0", "g1", "g2", "g4", "g5"]
    assert loader.skipped == 1 and loader.state_dict()["skipped"] == 1
    assert "sample 000000003: " in caplog.text and "1 so far" in caplog.text


def test_empty_shards_are_named_or_left_out(env, tmp_path, caplog):
    good = _write_tar(str(tmp_path / "a.tar"), [_members(i) for i in range(3)])
    empty = _write_tar(str(tmp_path / "b.tar"), [])
    zero_bytes = str(tmp_path / "c.tar")
    open(zero_bytes, "wb").close()
    with pytest.raises(DataError, match=f"shard {empty} holds no samples"):
        _loader(env, f"{good},{empty}", dp_size=1)
    with pytest.raises(DataError, match=f"shard {zero_bytes}: cannot read tar headers"):
        _loader(env, str(tmp_path / "[ac].tar"), dp_size=1)
    with caplog.at_level(logging.WARNING):
        loader = _loader(env, str(tmp_path / "*.tar"), dp_size=1, repeat=False, skip_bad_samples=True)
    assert loader.skipped_shards == 2 and f"skipping: shard {empty} holds no samples" in caplog.text
    assert sorted(_uids(loader)) == ["g0", "g1", "g2"]
    with pytest.raises(DataError, match="holds no readable samples"):
        _loader(env, empty, dp_size=1, skip_bad_samples=True)


def test_a_truncated_shard_is_named_or_read_as_far_as_it_goes(env, tmp_path, caplog):
    from megatron_papo.data.manifest import ShardInfo, write_manifest

    shards = [_write_tar(str(tmp_path / f"{n}.tar"), [_members(i + 4 * n) for i in range(4)]) for n in (0, 1)]
    manifest = write_manifest(str(tmp_path), [ShardInfo(p, 4, os.path.getsize(p)) for p in shards])
    data = open(shards[1], "rb").read()
    open(shards[1], "wb").write(data[: len(data) // 2])  # cut inside the third sample
    with pytest.raises(DataError, match=f"shard {shards[1]}: .* bytes on disk but {len(data)} in"):
        _loader(env, manifest, dp_size=1)

    loader = _loader(
        env, manifest, dp_size=1, repeat=False, shuffle=False, skip_bad_samples=True, num_workers=2
    )
    with caplog.at_level(logging.WARNING):
        uids = _uids(loader)
    assert uids == ["g0", "g1", "g2", "g3", "g4", "g5"] and loader.skipped == 2
    # the cut falls after sample 6's JSON: that sample lacks its image, sample 7 is not there at all
    assert f"shard {shards[1]}, sample 000000006: expected one image member img0" in caplog.text
    assert f"shard {shards[1]}, sample #3: the tar ends after 3 samples" in caplog.text

    # without a manifest the count by a header scan notices the missing end of the tar
    cut = f"shard {shards[1]}: the tar stops after 3 samples .*'000000006'.* truncated"
    with pytest.raises(DataError, match=cut):
        _loader(env, shards[1], dp_size=1)
    with caplog.at_level(logging.WARNING):
        loader = _loader(env, str(tmp_path / "*.tar"), dp_size=1, repeat=False, skip_bad_samples=True)
    assert loader.skipped_shards == 1 and sorted(_uids(loader)) == ["g0", "g1", "g2", "g3"]
