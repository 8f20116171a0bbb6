"""Tests for the video input side: CSV source, PyAV clip decoding and temporal sampling,
frame-consistent transforms, cube masks, grain pipelines, bad files, and the demo videos."""
import contextlib
import logging
import math
import os
import pickle

import numpy as np
import pytest

from maskfeat_jax import config as config_lib
from maskfeat_jax.data import masking
from maskfeat_jax.data import make_video_demo, pipeline, rand_augment, sources, transforms, video
from maskfeat_jax.data import video_decode, video_maps
from maskfeat_jax.data import video_transforms as VT

av = pytest.importorskip("av")


# ----------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------

def _config(csv_dir="", task="pretrain", image_size=64, batch=4, num_frames=8, sampling_rate=2,
            short_side=64, workers=0):
    c = config_lib.base_config()
    c.task = task
    c.seed = 0
    c.model.num_classes = 10
    c.input.image_size = image_size
    c.input.global_batch_size = batch
    c.input.worker_count = workers
    c.augment.randaug_ops = 0
    c.video.update(dict(num_frames=num_frames, sampling_rate=sampling_rate, short_side=short_side,
                        csv_dir=csv_dir, test_clips=2, test_crops=1))
    return c


def _write_video(path, clip, codec="libx264", gop=6):
    """Encodes ``clip`` (T, H, W, 3) uint8 at 30 fps with a keyframe every ``gop`` frames."""
    with av.open(str(path), mode="w") as container:
        options = {"crf": "10"} if codec == "libx264" else {}
        stream = container.add_stream(codec, rate=30, options=options)
        stream.width, stream.height = clip.shape[2], clip.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = gop
        if codec != "libx264":
            stream.bit_rate = 4_000_000
        for i, array in enumerate(clip):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _index_clip(n, h=48, w=64):
    """Frame ``i`` encodes ``i`` in gray levels: top half ``i % 16``, bottom half ``i // 16``
    (each as ``16 k + 8``), robust to lossy coding, resizing and cropping along the width."""
    clip = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        clip[i, : h // 2] = (i % 16) * 16 + 8
        clip[i, h // 2:] = (i // 16) * 16 + 8
    return clip


def _frame_ids(clip):
    h = clip.shape[1]
    lo = clip[:, h // 4, :, :].mean(axis=(1, 2))
    hi = clip[:, 3 * h // 4, :, :].mean(axis=(1, 2))
    return (np.floor(lo / 16) + 16 * np.floor(hi / 16)).astype(int).tolist()


def _ref_indices(n, num_frames, sampling_rate, start):
    """PySlowFast: linspace(start, start + T*sr - 1, T), truncated, clamped to [0, n-1]."""
    span = num_frames * sampling_rate
    step = (span - 1) / (num_frames - 1)
    return [min(max(int(math.floor(start + k * step + 1e-9)), 0), n - 1) for k in range(num_frames)]


@contextlib.contextmanager
def _iterate(ds):
    it = iter(ds)
    try:
        yield it
    finally:
        close = getattr(it, "close", None)
        if close is not None:
            close()


def _take(ds, n):
    with _iterate(ds) as it:
        return [next(it) for _ in range(n)]


def _write_csv(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("video_demo"))
    return make_video_demo.ensure_video_demo(d, num_train=10, num_val=5, frames=24, size=64, seed=0)


@pytest.fixture(scope="module")
def index_videos(tmp_path_factory):
    """40-frame index-coded videos in three containers/codecs."""
    d = tmp_path_factory.mktemp("index_videos")
    clip = _index_clip(40)
    return {"h264.mp4": _write_video(d / "a.mp4", clip, "libx264"),
            "mpeg4.mp4": _write_video(d / "b.mp4", clip, "mpeg4"),
            "vp9.webm": _write_video(d / "c.webm", clip, "libvpx-vp9")}


# ----------------------------------------------------------------------------
# 1. CSV parsing and the source
# ----------------------------------------------------------------------------

def test_parse_csv_formats(tmp_path):
    (tmp_path / "sub").mkdir()
    absolute = str(tmp_path / "elsewhere" / "x.webm")
    csv = _write_csv(tmp_path / "sub" / "train.csv", [
        "a.mp4 3", "", "dir/b.mp4,0", "   ", "c.mp4 , 7", f"{absolute} 12", "d.mp4\t1  \r", "",
        "air drumming/e.mp4,4"])
    items = video.parse_csv(csv)
    base = str(tmp_path / "sub")
    assert items == [(os.path.join(base, "a.mp4"), 3), (os.path.join(base, "dir/b.mp4"), 0),
                     (os.path.join(base, "c.mp4"), 7), (absolute, 12), (os.path.join(base, "d.mp4"), 1),
                     (os.path.join(base, "air drumming/e.mp4"), 4)]
    root = str(tmp_path / "videos")
    items = video.parse_csv(csv, root=root)
    assert items[0] == (os.path.join(root, "a.mp4"), 3) and items[3] == (absolute, 12)


@pytest.mark.parametrize("bad, what", [
    ("only_path.mp4", "field"), ("x.mp4 abc", "not an integer"), ("x.mp4 1.5", "not an integer"),
    ("x.mp4 1 2", "field"), ("x.mp4,1,extra", "field"), ("x.mp4,,1", "field"), ("x.mp4 -1", "negative"),
    ("air drumming/x.mp4 1", "field")])
def test_parse_csv_malformed_names_file_and_line(tmp_path, bad, what):
    csv = _write_csv(tmp_path / "val.csv", ["ok.mp4 0", "", bad, "ok2.mp4 1"])
    with pytest.raises(ValueError, match=f"{csv}:3: .*{what}"):
        video.parse_csv(csv)


def test_video_csv_source(tmp_path):
    csv = _write_csv(tmp_path / "train.csv", ["a.mp4 2", "b.mp4 5", "c.mp4 0"])
    src = video.VideoCsvSource(csv)
    assert len(src) == 3 and src.num_classes == 6
    assert src[1] == {"video": str(tmp_path / "b.mp4"), "label": 5}
    missing = str(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match=missing):
        video.VideoCsvSource(missing)
    empty = _write_csv(tmp_path / "empty.csv", ["", "  "])
    with pytest.raises(ValueError, match=empty):
        video.VideoCsvSource(empty)
    c = _config(csv_dir=str(tmp_path))
    _write_csv(tmp_path / "val.csv", ["v.mp4 1"])
    assert len(video.make_source(c, "train")) == 3 and len(video.make_source(c, "validation")) == 1
    c.video.root = "/data/k400"
    assert video.make_source(c, "val")[0]["video"] == "/data/k400/v.mp4"


# ----------------------------------------------------------------------------
# 2. temporal sampling and decoding
# ----------------------------------------------------------------------------

def test_temporal_indices_semantics():
    ti = video.temporal_indices
    # n = 100, clip span 16 -> delta 84; offset sampling: one clip centred, several from 0 to the end
    assert ti(100, 4, 4, clip_index=0, num_clips=1).tolist() == [42, 47, 52, 57]
    assert [ti(100, 4, 4, clip_index=c, num_clips=3)[0] for c in range(3)] == [0, 42, 84]
    assert ti(100, 4, 4, clip_index=2, num_clips=3).tolist() == [84, 89, 94, 99]
    assert [ti(100, 4, 4, clip_index=c, num_clips=3, use_offset=False)[0] for c in range(3)] == [0, 28, 56]
    # random start: start_fraction * delta
    assert ti(100, 4, 4, start_fraction=0.5).tolist() == [42, 47, 52, 57]
    assert ti(100, 16, 4, start_fraction=0.0).tolist() == _ref_indices(100, 16, 4, 0)
    # shorter than the span: start 0, clamped, the last frame repeated
    assert ti(10, 4, 4, clip_index=0, num_clips=1).tolist() == [0, 5, 9, 9]
    assert ti(10, 4, 4, start_fraction=0.99).tolist() == [0, 5, 9, 9]
    assert ti(1, 3, 2).tolist() == [0, 0, 0]
    # span override (target_fps): 8 frames over a 32-frame span
    assert ti(64, 8, 2, clip_index=0, num_clips=1, span=32).tolist() == [16, 20, 24, 29, 33, 38, 42, 47]
    with pytest.raises(ValueError):
        ti(10, 4, 4, clip_index=3, num_clips=3)


@pytest.mark.parametrize("kind", ["h264.mp4", "mpeg4.mp4", "vp9.webm"])
def test_decode_samples_the_right_frames(index_videos, kind, monkeypatch):
    path, n, t, sr = index_videos[kind], 40, 4, 3          # span 12, delta 28
    # the header count (mp4) or duration (webm) and the seek are trusted: no counting pass
    monkeypatch.setattr(video_decode, "_count_frames", lambda src: pytest.fail("fell back to counting frames"))
    frames, ok = video.decode_clip(path, None, num_frames=t, sampling_rate=sr, mode="test",
                                   clip_index=0, num_clips=1)
    assert ok and frames.dtype == np.uint8 and frames.shape == (t, 48, 64, 3)
    assert _frame_ids(frames) == _ref_indices(n, t, sr, 14)
    for c in range(4):                                     # offset sampling: starts 0, 9, 18, 27
        frames, ok = video.decode_clip(path, None, num_frames=t, sampling_rate=sr, mode="test",
                                       clip_index=c, num_clips=4)
        assert ok and _frame_ids(frames) == _ref_indices(n, t, sr, c * 9), (kind, c)
    starts = []
    for seed in range(6):                                   # train: start = U[0,1) * delta, one draw
        u = np.random.default_rng(seed).random()
        frames, ok = video.decode_clip(path, np.random.default_rng(seed), num_frames=t, sampling_rate=sr)
        ids = _frame_ids(frames)
        assert ok and ids == _ref_indices(n, t, sr, u * 28), (kind, seed)
        starts.append(ids[0])
    assert len(set(starts)) > 2
    # resize in the decoder: short side 24, long side floor(64 / 48 * 24) = 32
    frames, ok = video.decode_clip(path, None, num_frames=t, sampling_rate=sr, mode="test", short_side=24)
    assert ok and frames.shape == (t, 24, 32, 3) and _frame_ids(frames)[0] == 0


@pytest.mark.parametrize("header", ["over", "unknown", "under"])
def test_decode_wrong_header_count(index_videos, monkeypatch, header):
    """A header that over-counts (or no count) falls back to counting the decodable frames."""
    n = 40
    fake = {"over": n + 15, "unknown": 0, "under": n - 10}[header]
    monkeypatch.setattr(video_decode, "header_frame_count", lambda container, stream, fps: fake)
    frames, ok = video.decode_clip(index_videos["h264.mp4"], None, num_frames=4, sampling_rate=3, mode="test",
                                   clip_index=3, num_clips=4)
    used = n if header != "under" else n - 10
    assert ok and _frame_ids(frames) == _ref_indices(n, 4, 3, 3 * ((used - 12) // 3))


def test_decode_short_video_repeats_last_frame(tmp_path):
    path = _write_video(tmp_path / "short.mp4", _index_clip(5))
    for mode, rng in (("test", None), ("train", np.random.default_rng(0))):
        frames, ok = video.decode_clip(path, rng, num_frames=8, sampling_rate=2, mode=mode)
        assert ok and frames.shape == (8, 48, 64, 3)
        assert _frame_ids(frames) == [0, 2, 4, 4, 4, 4, 4, 4] == _ref_indices(5, 8, 2, 0)


def test_decode_target_fps_rescales_span(index_videos):
    # a 30 fps video read at target_fps 15: the span doubles (2 * 2 * 30 / 15 = 8 frames)
    frames, ok = video.decode_clip(index_videos["h264.mp4"], None, num_frames=2, sampling_rate=2,
                                   mode="test", clip_index=0, num_clips=2, target_fps=15)
    assert ok and _frame_ids(frames) == [0, 7]


def test_the_config_target_fps_and_flip_reach_the_clip_maps(index_videos):
    c = _config(image_size=32, short_side=48, num_frames=2, sampling_rate=2)
    element = {"video": index_videos["h264.mp4"], "label": 0}
    assert _frame_ids(video.VideoEvalMap(c, 0, 2).map(element)["image"]) == [0, 3]     # a 4-frame span
    c.video.target_fps = 15.0                                     # the span doubles, as in decode_clip
    assert _frame_ids(video.VideoEvalMap(c, 0, 2).map(element)["image"]) == [0, 7]
    c.video.target_fps = 0.0
    clip = np.zeros((40, 48, 64, 3), np.uint8)
    clip[:, :, :32] = 255                                          # left half white: a flip shows
    flat = {"video": _write_video(index_videos["h264.mp4"].rsplit("/", 1)[0] + "/lr.mp4", clip), "label": 0}
    for task in ("pretrain", "finetune"):
        c.task = task
        for flip, expect_flips in ((True, True), (False, False)):
            c.augment.flip = flip
            left = [video.VideoTrainMap(c).random_map(flat, np.random.default_rng(s))["image"][0, :, :8].mean()
                    for s in range(12)]
            right = [video.VideoTrainMap(c).random_map(flat, np.random.default_rng(s))["image"][0, :, -8:].mean()
                     for s in range(12)]
            flipped = sum(r > l for l, r in zip(left, right))
            assert (flipped > 0) == expect_flips, (task, flip, flipped)


def test_the_fine_tuning_crop_scale_reaches_the_clip_map(index_videos, monkeypatch):
    c = _config(image_size=32, short_side=48, num_frames=2, sampling_rate=2)
    element = {"video": index_videos["h264.mp4"], "label": 0}
    scales, crop = [], video_maps.VT.random_resized_crop
    monkeypatch.setattr(video_maps.VT, "random_resized_crop", lambda *a, scale, **k: scales.append(scale) or crop(
        *a, scale=scale, **k))
    c.task, c.augment.crop_min_scale = "finetune", 0.9
    assert video.VideoTrainMap(c).random_map(element, np.random.default_rng(0))["image"].shape == (2, 32, 32, 3)
    c.task = "pretrain"                                         # pre-training's crop is the spec's (0.5, 1)
    video.VideoTrainMap(c).random_map(element, np.random.default_rng(0))
    assert scales == [(0.9, 1.0), (0.5, 1.0)]


def _corrupt_files(d, good):
    data = open(good, "rb").read()
    files = {"truncated": data[: len(data) // 2], "random": np.random.default_rng(0).integers(
        0, 256, 4096, dtype=np.uint8).tobytes(), "empty": b"", "text": b"not a video\n"}
    paths = {}
    for name, payload in files.items():
        p = os.path.join(d, f"{name}.mp4")
        with open(p, "wb") as f:
            f.write(payload)
        paths[name] = p
    audio = os.path.join(d, "audio_only.mp4")
    with av.open(audio, mode="w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in s.encode(frame):
            c.mux(packet)
        for packet in s.encode():
            c.mux(packet)
    paths["audio_only"] = audio
    paths["missing"] = os.path.join(d, "missing.mp4")
    return paths


def test_corrupt_videos_are_blank_and_invalid(tmp_path, index_videos, caplog):
    paths = _corrupt_files(str(tmp_path), index_videos["h264.mp4"])
    for name, p in paths.items():
        for mode in ("train", "test"):
            frames, ok = video.decode_clip(p, np.random.default_rng(0), num_frames=4, sampling_rate=2,
                                           mode=mode, short_side=32)
            assert not ok, name
            assert frames.shape == (4, 32, 32, 3) and frames.dtype == np.uint8 and not frames.any(), name
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        video.decode_clip(paths["random"], None, mode="test")
    assert not caplog.records, "a path is warned about once"
    new = str(tmp_path / "another_missing.mp4")
    with caplog.at_level(logging.WARNING):
        video.decode_clip(new, None, mode="test")
        video.decode_clip(new, None, mode="test")
    assert len([r for r in caplog.records if new in r.getMessage()]) == 1


# ----------------------------------------------------------------------------
# 3. frame-consistent transforms
# ----------------------------------------------------------------------------

def _offset_clip(t=5, h=40, w=56, seed=0):
    """Frames = one random image plus a per-frame constant offset 20 * t."""
    base = np.random.default_rng(seed).integers(0, 150, (h, w, 3), dtype=np.uint8)
    return np.stack([base + np.uint8(20 * i) for i in range(t)])


def test_same_crop_and_flip_for_every_frame():
    clip = _offset_clip()
    flips = set()
    for seed in range(8):
        out = VT.random_flip(VT.random_resized_crop(clip, np.random.default_rng(seed), 32, scale=(0.08, 1.0)),
                             np.random.default_rng(seed + 100))
        assert out.shape == (5, 32, 32, 3) and out.dtype == np.uint8
        diff = out.astype(int) - out[:1].astype(int)
        for i in range(5):   # a linear resize of the same crop keeps the per-frame offset (+-1 rounding)
            assert np.abs(diff[i] - 20 * i).max() <= 1, (seed, i)
        # frame 0 equals the image transform with the same crop parameters (bilinear)
        ref = transforms.random_resized_crop(clip[0], np.random.default_rng(seed), 32, scale=(0.08, 1.0),
                                             interpolation="bilinear")
        flipped = np.random.default_rng(seed + 100).random() < 0.5
        np.testing.assert_array_equal(out[0], ref[:, ::-1] if flipped else ref)
        flips.add(flipped)
    assert flips == {True, False}


def test_rand_augment_same_ops_every_frame():
    a = _offset_clip(t=1)[0]
    b = np.ascontiguousarray(a[::-1])
    changed = 0
    for seed in range(12):
        out = VT.rand_augment_clip(np.stack([a, b, a, a]), np.random.default_rng(seed), num_ops=2, magnitude=9)
        np.testing.assert_array_equal(out[0], out[2])
        np.testing.assert_array_equal(out[0], out[3])
        seed_draw = int(np.random.default_rng(seed).integers(0, 2 ** 63 - 1))
        ref_b = rand_augment.rand_augment(b, np.random.default_rng(seed_draw), num_ops=2, magnitude=9,
                                        magnitude_std=0.5, fill=(128, 128, 128), interpolation="bicubic")
        np.testing.assert_array_equal(out[1], ref_b)
        changed += int(not np.array_equal(out[0], a))
    assert changed >= 6


def test_resize_short_side_and_uniform_crop():
    clip = np.zeros((2, 48, 64, 3), np.uint8)
    assert VT.resize_short_side(clip, 24).shape == (2, 24, 32, 3)
    assert VT.resize_short_side(np.zeros((1, 50, 30, 3), np.uint8), 20).shape == (1, 33, 20, 3)
    assert VT.resize_short_side(clip, 48) is clip
    cols = np.broadcast_to(np.arange(70, dtype=np.uint8)[None, None, :, None], (2, 30, 70, 3)).copy()
    # landscape: crops move along the width; centre offset ceil((70 - 30) / 2) = 20
    assert [int(VT.uniform_crop(cols, 30, i)[0, 0, 0, 0]) for i in range(3)] == [0, 20, 40]
    rows = np.ascontiguousarray(np.swapaxes(cols, 1, 2))        # portrait 70 x 30
    assert [int(VT.uniform_crop(rows, 30, i)[0, 0, 0, 0]) for i in range(3)] == [0, 20, 40]
    odd = np.broadcast_to(np.arange(33, dtype=np.uint8)[None, None, :, None], (1, 30, 33, 3)).copy()
    assert int(VT.center_crop(odd, 30)[0, 0, 0, 0]) == 2          # ceil(3 / 2)
    assert VT.uniform_crop(np.zeros((3, 8, 8, 3), np.uint8), 16, 1).shape == (3, 16, 16, 3)
    with pytest.raises(ValueError):
        VT.uniform_crop(clip, 16, 3)


# ----------------------------------------------------------------------------
# 4. cube mask
# ----------------------------------------------------------------------------

def test_cube_mask_grid_and_upsampling_order(demo_dir):
    c = _config(demo_dir, image_size=64, num_frames=8)
    assert video.prediction_grid(c) == (4, 4, 4)
    tmap = video.VideoTrainMap(c)
    element = video.make_source(c, "train")[0]
    cap = int(round(4 * 2 * 2 * c.mask.ratio))
    varies_in_time = 0
    for seed in range(10):
        out = tmap.random_map(element, np.random.default_rng(seed))
        assert out["mask"].dtype == bool and out["mask"].shape == (64,)
        m = out["mask"].reshape(4, 4, 4)                               # (t, h, w)
        coarse = m[:, ::2, ::2]                                         # one unit = 2x2 tokens
        np.testing.assert_array_equal(masking.upsample_mask(coarse, (4, 4, 4)), m)
        assert 0 < coarse.sum() <= cap
        varies_in_time += int(not (coarse == coarse[:1]).all())
    assert varies_in_time > 0
    # an explicit grid: (t, h, w) with t not upsampled
    out = video.VideoTrainMap(c, grid=(2, 8, 8)).random_map(element, np.random.default_rng(0))
    m = out["mask"].reshape(2, 8, 8)
    np.testing.assert_array_equal(masking.upsample_mask(m[:, ::2, ::2], (2, 8, 8)), m)
    with pytest.raises(ValueError, match="even"):
        video.VideoTrainMap(c, grid=(4, 3, 3))
    # MAE draws its own mask in the step: the map leaves an all-False placeholder, on any grid
    c.mae.enabled = True
    out = video.VideoTrainMap(c, grid=(4, 3, 3)).random_map(element, np.random.default_rng(0))
    assert out["mask"].shape == (36,) and not out["mask"].any()


# ----------------------------------------------------------------------------
# 5. pipelines
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_train_dataset_batches(demo_dir, task):
    c = _config(demo_dir, task=task, image_size=32, short_side=40, batch=4, num_frames=8)
    if task == "finetune":
        c.augment.randaug_ops, c.augment.erase_prob = 2, 1.0
    src = video.make_source(c, "train")
    grid = (4, 2, 2)
    batches = _take(video.train_dataset(c, src, grid), 3)
    for b in batches:
        assert b["image"].dtype == np.uint8 and b["image"].shape == (4, 8, 32, 32, 3)
        assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
        assert b["valid"].dtype == bool and b["valid"].all()
        assert b["image"].reshape(4, -1).any(axis=1).all()
        if task == "pretrain":
            assert set(b) == {"image", "mask", "label", "valid"}
            assert b["mask"].dtype == bool and b["mask"].shape == (4, 16)
        else:
            assert set(b) == {"image", "erase_box", "label", "valid"}
            assert b["erase_box"].dtype == np.int32 and b["erase_box"].shape == (4, 4)
    labels = np.concatenate([b["label"] for b in batches])
    assert ((labels >= 0) & (labels < 10)).all()
    again = _take(video.train_dataset(c, src, grid), 3)
    for x, y in zip(batches, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    # two hosts: disjoint halves of the global batch
    hosts = [_take(video.train_dataset(c, src, grid, process_index=i, process_count=2), 2) for i in range(2)]
    assert all(b["image"].shape[0] == 2 for h in hosts for b in h)


def test_one_pipeline_for_images_and_clips(demo_dir):
    """``pipeline.train_dataset`` / ``eval_batches`` serve clips when ``config.input.dataset`` is a
    video dataset: the same batches as ``video.train_dataset`` / ``eval_batches``."""
    c = _config(demo_dir, task="finetune", image_size=32, short_side=40, batch=4, num_frames=4)
    c.video.num_sample, c.augment.erase_prob = 2, 1.0
    src = video.make_source(c, "train")
    assert not sources.serves_clips(c) and isinstance(pipeline.train_map(c, (2, 2)), pipeline.TrainMap)
    c.input.dataset = "video_csv"
    assert sources.serves_clips(c) and isinstance(pipeline.train_map(c), video.VideoTrainMap)
    for start in (0, 3):
        a = _take(pipeline.train_dataset(c, src, (2, 2, 2), start_batch=start), 2)
        b = _take(video.train_dataset(c, src, (2, 2, 2), start_batch=start), 2)
        assert a[0]["image"].shape == (4, 4, 32, 32, 3)
        for x, y in zip(a, b):
            assert sorted(x) == sorted(y)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    val = video.make_source(c, "validation")
    a = list(pipeline.eval_batches(c, val, 2, process_index=1, process_count=2))
    b = list(video.eval_batches(c, val, 2, process_index=1, process_count=2))
    assert len(a) == len(b) == math.ceil(math.ceil(5 / 2) * 2 / 2)      # the last one all padding
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y) == ["image", "label", "valid", "video_index", "view"]
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    assert not a[-1]["valid"].any() and (a[-1]["video_index"] == -1).all() and a[-1]["image"].shape[0] == 2


def test_bad_videos_in_the_pipelines(tmp_path, index_videos):
    paths = _corrupt_files(str(tmp_path), index_videos["h264.mp4"])
    bad = sorted(paths)
    lines = [f"{index_videos['h264.mp4']} 0"] + [f"{paths[name]} {k + 1}" for k, name in enumerate(bad)]
    _write_csv(tmp_path / "train.csv", lines)
    _write_csv(tmp_path / "val.csv", lines)
    n = len(lines)
    for task in ("pretrain", "finetune"):
        c = _config(str(tmp_path), task=task, image_size=32, short_side=32, batch=n, num_frames=4)
        batches = _take(video.train_dataset(c, video.make_source(c, "train"), (2, 2, 2)), 2)
        for b in batches:
            assert b["image"].shape == (n, 4, 32, 32, 3)
            np.testing.assert_array_equal(b["valid"], b["label"] == 0)
            assert not b["image"][~b["valid"]].any() and b["image"][b["valid"]].any()
    c = _config(str(tmp_path), image_size=32, short_side=32, num_frames=4)
    ev = list(video.eval_batches(c, video.make_source(c, "val"), 5, num_clips=2, num_crops=1))
    valid = np.concatenate([b["valid"] for b in ev])
    vid = np.concatenate([b["video_index"] for b in ev])
    assert len(ev) == math.ceil(n * 2 / 5)
    np.testing.assert_array_equal(valid, vid == 0)
    assert sorted(vid[vid >= 0].tolist()) == sorted(list(range(n)) * 2)


@pytest.mark.parametrize("pc, num_crops", [(1, 1), (2, 3)])
def test_eval_covers_every_view_exactly_once(tmp_path, pc, num_crops):
    n_videos, num_clips, bs, t, sr, frames = 5, 3, 4, 4, 2, 20
    lines = []
    for k in range(n_videos):
        _write_video(tmp_path / f"v{k}.mp4", _index_clip(frames + k, h=32, w=48))
        lines.append(f"v{k}.mp4 {k}")
    _write_csv(tmp_path / "val.csv", lines)
    c = _config(str(tmp_path), image_size=32, short_side=32, num_frames=t, sampling_rate=sr)
    src = video.make_source(c, "val")
    views = num_clips * num_crops
    hosts = [list(video.eval_batches(c, src, bs, num_clips, num_crops, process_index=i, process_count=pc))
             for i in range(pc)]
    expected_batches = math.ceil(math.ceil(n_videos / pc) * views / bs)
    assert {len(h) for h in hosts} == {expected_batches}
    seen = []
    for i, h in enumerate(hosts):
        for b in h:
            assert b["image"].shape == (bs, t, 32, 32, 3) and b["image"].dtype == np.uint8
            assert b["view"].dtype == np.int32 and b["video_index"].dtype == np.int32
            v = b["valid"]
            assert not (~v[:-1] & v[1:]).any(), "padding only at the end"
            assert (b["video_index"][~v] == -1).all() and not b["image"][~v].any()
            for img, vi, view, label in zip(b["image"][v], b["video_index"][v], b["view"][v], b["label"][v]):
                assert vi % pc == i and label == vi
                clip = view // num_crops
                n = frames + int(vi)
                delta = n - t * sr
                assert _frame_ids(img) == _ref_indices(n, t, sr, clip * (delta // (num_clips - 1)))
                seen.append((int(vi), int(view)))
    assert sorted(seen) == [(k, v) for k in range(n_videos) for v in range(views)]


def test_eval_three_crops_are_left_centre_right(tmp_path):
    clip = np.zeros((6, 32, 64, 3), np.uint8)
    clip[:, :, :, :] = (np.arange(64, dtype=np.uint8) * 4)[None, None, :, None]   # value = 4 * column
    _write_video(tmp_path / "g.mp4", clip)
    c = _config(str(tmp_path), image_size=32, short_side=40, num_frames=2, sampling_rate=2)
    element = {"video": str(tmp_path / "g.mp4"), "label": 0}

    def column(out):   # source column seen at output columns 1..3
        return out["image"][0, 16, 1:4, 0].mean() / 4

    # 3 crops: short side to image_size (32, unchanged), crops at x = 0, 16, 32
    for s, x in zip((0, 1, 2), (0, 16, 32)):
        out = video.VideoEvalMap(c, 0, 1, spatial_index=s).map(element)
        assert out["valid"] and out["image"].shape == (2, 32, 32, 3)
        assert abs(column(out) - (x + 2)) <= 1, s
    # 1 crop: short side to config.video.short_side (40 -> 40x80), centre crop at x = 24,
    # i.e. source column (24 + 2 + 0.5) / 1.25 - 0.5 = 20.7
    out = video.VideoEvalMap(c, clip_index=0, num_clips=1).map(element)
    assert out["image"].shape == (2, 32, 32, 3) and abs(column(out) - 20.7) <= 1


def test_transforms_pickle(demo_dir):
    c = _config(demo_dir)
    for obj in (video.VideoTrainMap(c), video.VideoEvalMap(c, 1, 3, spatial_index=2)):
        clone = pickle.loads(pickle.dumps(obj))
        assert vars(clone).keys() == vars(obj).keys()


# ----------------------------------------------------------------------------
# 6. demo dataset
# ----------------------------------------------------------------------------

def _digit_templates():
    """Zero-mean, unit-norm 32x32 class means of the scikit-learn digits."""
    from PIL import Image
    from sklearn.datasets import load_digits
    d = load_digits()
    out = []
    for k in range(10):
        mean = (d.images[d.target == k].mean(0) / 16 * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(mean).resize((32, 32), Image.Resampling.BICUBIC), np.float32)
        t = t - t.mean()
        out.append(t / np.linalg.norm(t))
    return out


def test_make_video_demo(tmp_path, demo_dir):
    for split, count in (("train", 10), ("val", 5)):
        lines = open(os.path.join(demo_dir, f"{split}.csv")).read().splitlines()
        assert len(lines) == count
        for i, line in enumerate(lines):
            rel, label = line.split(" ")
            assert not os.path.isabs(rel) and rel.startswith(f"{split}/") and int(label) == i % 10
    from scipy.signal import correlate2d
    templates = _digit_templates()
    correct, total = 0, 0
    for split in ("train", "val"):
        src = video.VideoCsvSource(os.path.join(demo_dir, f"{split}.csv"))
        for k in range(len(src)):
            frames, ok = video.decode_clip(src[k]["video"], None, num_frames=4, sampling_rate=6, mode="test",
                                           clip_index=0, num_clips=1)
            assert ok and frames.shape == (4, 64, 64, 3)
            assert frames.reshape(4, -1).max(1).min() > 60           # a digit in every frame
            assert not np.array_equal(frames[0], frames[-1])          # and it moves
            gray = frames[0].mean(-1)                                 # best class template anywhere in the frame
            pred = int(np.argmax([correlate2d(gray, t, mode="valid").max() for t in templates]))
            correct += int(pred == src[k]["label"])
            total += 1
    assert correct / total >= 0.8, f"digit/label agreement {correct}/{total}"
    # created once; deterministic from the seed; the CLI writes the same layout
    mtime = os.path.getmtime(os.path.join(demo_dir, "train.csv"))
    make_video_demo.ensure_video_demo(demo_dir, num_train=10, num_val=5, frames=24, size=64)
    assert os.path.getmtime(os.path.join(demo_dir, "train.csv")) == mtime
    other = str(tmp_path / "cli")
    assert make_video_demo.main(["--out", other, "--num_train", "10", "--num_val", "5", "--frames", "24"]) == 0
    for rel in ("train.csv", "val.csv", "train/00007.mp4", "val/00003.mp4"):
        with open(os.path.join(other, rel), "rb") as a, open(os.path.join(demo_dir, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_worker_processes_match_in_process(tmp_path, demo_dir):
    """grain workers (spawned processes): the same batches as in-process, bad files included."""
    lines = open(os.path.join(demo_dir, "train.csv")).read().splitlines()[:5]
    lines = [f"{os.path.join(demo_dir, line.split()[0])} {line.split()[1]}" for line in lines]
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    lines.append(f"{tmp_path / 'broken.mp4'} 9")
    _write_csv(tmp_path / "train.csv", lines)
    _write_csv(tmp_path / "val.csv", lines)
    c = _config(str(tmp_path), image_size=32, short_side=40, batch=3, num_frames=4)
    src = video.make_source(c, "train")
    local = _take(video.train_dataset(c, src, (2, 2, 2)), 4)
    c.input.worker_count = 1
    remote = _take(video.train_dataset(c, src, (2, 2, 2)), 4)
    for x, y in zip(local, remote):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    valid = np.concatenate([b["valid"] for b in remote])
    labels = np.concatenate([b["label"] for b in remote])
    np.testing.assert_array_equal(valid, labels != 9)
    ev_local = list(video.eval_batches(c, src, 4, num_clips=2, num_crops=1))
    ev_remote = list(video.eval_batches(c, src, 4, num_clips=2, num_crops=1, worker_count=1))
    assert len(ev_local) == len(ev_remote) == 3
    for x, y in zip(ev_local, ev_remote):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ----------------------------------------------------------------------------
# 7. repeated augmentation (video.num_sample)
# ----------------------------------------------------------------------------

def _level_clip(n=16, h=40, w=56):
    """Frame ``i`` is gray ``16 i + 8`` plus a horizontal ramp of +-6 levels: every crop or
    flip of it keeps ``floor(mean / 16) == i``, yet different crops differ in pixels."""
    ramp = np.round(np.linspace(-6, 6, w)).astype(np.int16)
    clip = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        clip[i] = (16 * i + 8 + ramp)[None, :, None]
    return clip


def _levels(clip):
    return np.floor(clip.reshape(clip.shape[0], -1).mean(1) / 16).astype(int).tolist()


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_repeated_augmentation_batches(demo_dir, task):
    c = _config(demo_dir, task=task, image_size=32, short_side=40, batch=4, num_frames=8)
    c.video.num_sample = 2
    if task == "finetune":
        c.augment.randaug_ops, c.augment.erase_prob = 2, 1.0
    src = video.make_source(c, "train")
    batches = _take(video.train_dataset(c, src, (4, 2, 2)), 3)
    for b in batches:
        assert b["image"].dtype == np.uint8 and b["image"].shape == (4, 8, 32, 32, 3)
        assert b["label"].dtype == np.int32 and b["label"].shape == (4,)
        assert b["valid"].dtype == bool and b["valid"].shape == (4,) and b["valid"].all()
        extra = "mask" if task == "pretrain" else "erase_box"
        assert set(b) == {"image", extra, "label", "valid"}
        assert b[extra].shape == ((4, 16) if task == "pretrain" else (4, 4))
        # rows (0, 1) and (2, 3) are the two views of one video: same label, other augmentation
        np.testing.assert_array_equal(b["label"][0::2], b["label"][1::2])
        for i in (0, 2):
            assert not np.array_equal(b["image"][i], b["image"][i + 1])
    # 3 steps x 2 videos: six distinct videos of the 10 (one shuffled epoch, no repeats yet)
    labels = np.concatenate([b["label"][0::2] for b in batches])
    assert len(labels) == 6 and len(set(labels.tolist())) == 6   # the demo labels are i % 10
    again = _take(video.train_dataset(c, src, (4, 2, 2)), 3)
    for x, y in zip(batches, again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    c.seed = 1
    other = _take(video.train_dataset(c, src, (4, 2, 2)), 1)[0]
    assert not np.array_equal(other["image"], batches[0]["image"])
    # grain worker processes: the same batches
    c.seed, c.input.worker_count = 0, 1
    remote = _take(video.train_dataset(c, src, (4, 2, 2)), 2)
    for x, y in zip(batches, remote):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)
    c.input.worker_count = 0
    # two hosts: one video (two clips) each per step, different videos
    hosts = [_take(video.train_dataset(c, src, (4, 2, 2), process_index=i, process_count=2), 2) for i in range(2)]
    for h in hosts:
        for b in h:
            assert b["image"].shape[0] == 2 and b["label"][0] == b["label"][1]
    assert hosts[0][0]["label"][0] != hosts[1][0]["label"][0]


def test_repeated_views_share_one_decode(tmp_path, monkeypatch):
    """One decode (one temporal window) per video; every view draws its own crop and flip."""
    path = _write_video(tmp_path / "levels.mp4", _level_clip())
    c = _config(task="finetune", image_size=32, short_side=40, num_frames=4, sampling_rate=1)
    c.augment.randaug_ops = 0
    c.video.num_sample = 3
    calls = []
    decode = video.decode_clip
    monkeypatch.setattr(video_decode, "decode_clip", lambda *a, **k: calls.append(a[0]) or decode(*a, **k))
    tm = video.VideoTrainMap(c)
    starts = set()
    for seed in range(8):
        out = tm.random_map({"video": path, "label": 7}, np.random.default_rng(seed))
        assert out["image"].shape == (3, 4, 32, 32, 3) and out["erase_box"].shape == (3, 4)
        np.testing.assert_array_equal(out["label"], [7, 7, 7])
        assert out["label"].dtype == np.int32 and out["valid"].dtype == bool and out["valid"].all()
        ids = [_levels(view) for view in out["image"]]
        assert ids[0] == ids[1] == ids[2] and ids[0] == list(range(ids[0][0], ids[0][0] + 4)), ids
        starts.add(ids[0][0])
        assert len({view.tobytes() for view in out["image"]}) > 1
    assert len(calls) == 8                     # one decode per video, not per view
    assert len(starts) > 1                     # the shared window itself is random
    # view 0 of k continues the stream of a single view: num_sample=1 output is unchanged
    c1 = _config(task="finetune", image_size=32, short_side=40, num_frames=4, sampling_rate=1)
    c1.augment.randaug_ops = 0
    single = video.VideoTrainMap(c1).random_map({"video": path, "label": 7}, np.random.default_rng(3))
    multi = tm.random_map({"video": path, "label": 7}, np.random.default_rng(3))
    assert single["image"].shape == (4, 32, 32, 3) and single["label"].shape == ()
    np.testing.assert_array_equal(single["image"], multi["image"][0])
    np.testing.assert_array_equal(single["erase_box"], multi["erase_box"][0])
    # an undecodable video: k blank, invalid views
    bad = tm.random_map({"video": str(tmp_path / "missing.mp4"), "label": 1}, np.random.default_rng(0))
    assert bad["image"].shape == (3, 4, 32, 32, 3) and not bad["image"].any() and not bad["valid"].any()


def test_num_sample_batch_divisibility_and_epoch_length(demo_dir):
    c = _config(demo_dir, task="finetune", batch=6)
    c.video.num_sample = 4
    src = video.make_source(c, "train")
    with pytest.raises(ValueError, match=r"config\.input\.global_batch_size=6.*config\.video\.num_sample=4"):
        video.train_dataset(c, src, (4, 2, 2))
    c.input.global_batch_size, c.video.num_sample = 4, 2
    assert video.check_batch(c, 1) == 2 and video.check_batch(c, 2) == 1
    with pytest.raises(ValueError, match=r"config\.video\.num_sample=2 x 4 process"):
        video.train_dataset(c, src, (4, 2, 2), process_index=0, process_count=4)
    for bad in (0, -1):
        c.video.num_sample = bad
        with pytest.raises(ValueError, match=r"config\.video\.num_sample"):
            video.VideoTrainMap(c)
    # an epoch is one pass over the videos: 10 videos, 4 clips of 2 videos per step
    c.video.num_sample = 2
    assert video.steps_per_epoch(c, 10) == 5
    c.video.num_sample = 1
    assert video.steps_per_epoch(c, 10) == 2 and video.steps_per_epoch(c, 3) == 1
    assert config_lib.base_config().video.num_sample == 1
