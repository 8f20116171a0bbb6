"""Tests for Something-Something v2 input: the official label files and frame lists, segment
sampling against PySlowFast's formula written out by hand, clip decoding, and the demo set."""
import collections
import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from maskfeat_jax.data import make_ssv2_demo, ssv2
from references import encode_clip, frame_ids, index_clip

av = pytest.importorskip("av")

LABELS = {"Moving something up": "0", "Putting something onto something": "1",
          "Pretending to put something into something": "2"}


def _write_json(path, data):
    path.write_text(json.dumps(data))
    return str(path)


def _entry(video_id, template, label="free text, not a class"):
    return {"id": video_id, "label": label, "template": template, "placeholders": ["a cup"]}


def _data_dir(tmp_path, train, validation=()):
    _write_json(tmp_path / ssv2.LABELS_FILE, LABELS)
    _write_json(tmp_path / ssv2.ANNOTATION_FILES["train"], list(train))
    _write_json(tmp_path / ssv2.ANNOTATION_FILES["validation"], list(validation))
    return str(tmp_path)


# ----------------------------------------------------------------------------
# 1. label files and frame lists
# ----------------------------------------------------------------------------

def test_template_key_removes_only_brackets():
    assert ssv2.template_key("Putting [something] onto [something]") == "Putting something onto something"
    assert ssv2.template_key("Moving [part] of [something]") == "Moving part of something"
    assert ssv2.template_key("Tearing [something] just a little bit") == "Tearing something just a little bit"


def test_read_labels_and_annotations_exact(tmp_path):
    d = _data_dir(tmp_path, [_entry("78687", "Putting [something] onto [something]", "moving cup up"),
                             _entry(12, "Moving [something] up"),
                             _entry("5", "Pretending to put [something] into [something]")])
    labels = ssv2.read_labels(os.path.join(d, ssv2.LABELS_FILE))
    assert labels == {"Moving something up": 0, "Putting something onto something": 1,
                      "Pretending to put something into something": 2}
    # the class comes from the template (the free-text label of the first entry says "up": ignored)
    assert ssv2.read_annotations(os.path.join(d, ssv2.ANNOTATION_FILES["train"]), labels) == [
        ("78687", 1), ("12", 0), ("5", 2)]


@pytest.mark.parametrize("bad, what", [
    ("not an object", "expected an object"),
    ({"template": "Moving [something] up"}, "'id'"),
    ({"id": "77"}, "'template'"),
    ({"id": "77", "template": "Moving [something] sideways"}, "not a class"),
    ({"id": "77", "template": "Moving [something] Up"}, "not a class"),     # keys are case-sensitive
])
def test_malformed_annotation_names_file_and_entry(tmp_path, bad, what):
    d = _data_dir(tmp_path, [_entry("1", "Moving [something] up"), _entry("2", "Moving [something] up"), bad])
    path = os.path.join(d, ssv2.ANNOTATION_FILES["train"])
    with pytest.raises(ValueError, match="entry 2") as e:
        ssv2.read_annotations(path, ssv2.read_labels(os.path.join(d, ssv2.LABELS_FILE)))
    assert path in str(e.value) and what in str(e.value)
    if isinstance(bad, dict) and "id" in bad:
        assert "'77'" in str(e.value)


def test_malformed_json_files_name_the_file(tmp_path):
    broken = tmp_path / "something-something-v2-train.json"
    broken.write_text('[{"id": "1", "template": "Moving [something] up"},')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        ssv2.read_annotations(str(broken), {"Moving something up": 0})
    assert str(broken) in str(e.value)
    with pytest.raises(ValueError, match="expected a JSON list"):
        ssv2.read_annotations(_write_json(tmp_path / "dict.json", {"id": "1"}), {})
    labels = _write_json(tmp_path / "labels.json", {"Moving something up": "0", "Moving something down": "x"})
    with pytest.raises(ValueError, match="'Moving something down'") as e:
        ssv2.read_labels(labels)
    assert labels in str(e.value)
    with pytest.raises(ValueError, match="non-negative"):
        ssv2.read_labels(_write_json(tmp_path / "neg.json", {"Moving something up": "-1"}))


def test_read_frame_lists_exact_and_errors(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("original_vido_id video_id frame_id path labels\n"
                    '78687 0 1 78687/78687_000001.jpg ""\n'
                    '78687 0 2 78687/78687_000002.jpg ""\n'
                    "\n"
                    '42 1 1 42/42_000001.jpg "3,5"\n'
                    '78687 0 3 78687/78687_000003.jpg ""\n')
    assert ssv2.read_frame_lists(str(path)) == {
        "78687": ["78687/78687_000001.jpg", "78687/78687_000002.jpg", "78687/78687_000003.jpg"],
        "42": ["42/42_000001.jpg"]}
    assert ssv2.read_frame_lists(str(path), prefix="/frames")["42"] == ["/frames/42/42_000001.jpg"]
    bad = tmp_path / "bad.csv"
    bad.write_text('original_vido_id video_id frame_id path labels\n1 0 1 1/a.jpg ""\n1 0 2 1/b.jpg\n')
    with pytest.raises(ValueError, match="expected 5 fields") as e:
        ssv2.read_frame_lists(str(bad))
    assert f"{bad}:3:" in str(e.value)
    headless = tmp_path / "headless.csv"
    headless.write_text('1 0 1 1/a.jpg ""\n')
    with pytest.raises(ValueError, match="header") as e:
        ssv2.read_frame_lists(str(headless))
    assert f"{headless}:1:" in str(e.value)


def test_video_records_skip_and_count_missing_videos(tmp_path, caplog):
    d = _data_dir(tmp_path, [_entry("1", "Moving [something] up"), _entry("2", "Putting [something] onto [something]"),
                             _entry("3", "Moving [something] up")],
                  [_entry("9", "Moving [something] up")])
    videos = tmp_path / ssv2.VIDEO_DIR
    videos.mkdir()
    (videos / "1.webm").write_bytes(b"x")
    (videos / "3.mp4").write_bytes(b"x")            # transcoded copies are found too
    with caplog.at_level(logging.WARNING):
        records, missing = ssv2.video_records(d, "train")
    assert records == [(str(videos / "1.webm"), 0), (str(videos / "3.mp4"), 0)] and missing == 1
    assert "skipping 1 video(s)" in caplog.text and "(first: 2)" in caplog.text
    source = ssv2.Ssv2Source(d, "train")
    assert len(source) == 2 and source.missing == 1 and source.num_classes == 3
    assert source[1] == {"video": str(videos / "3.mp4"), "label": 0}
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "9.webm").write_bytes(b"x")
    assert ssv2.video_records(d, "val", video_root=str(other)) == ([(str(other / "9.webm"), 0)], 0)
    with pytest.raises(ValueError, match="no videos"):
        ssv2.Ssv2Source(d, "validation")            # 9.webm is not under the default root
    with pytest.raises(ValueError, match="split"):
        ssv2.video_records(d, "test")


def test_frame_records_from_frame_list(tmp_path):
    d = _data_dir(tmp_path, [_entry("10", "Moving [something] up"), _entry("11", "Moving [something] up")],
                  [_entry("20", "Pretending to put [something] into [something]"),
                   _entry("21", "Moving [something] up")])
    (tmp_path / "val.csv").write_text("original_vido_id video_id frame_id path labels\n"
                                      '20 0 1 20/1.jpg ""\n20 0 2 20/2.jpg ""\n')
    records, missing = ssv2.frame_records(d, "validation", prefix="/f")
    assert records == [(["/f/20/1.jpg", "/f/20/2.jpg"], 2)] and missing == 1
    source = ssv2.Ssv2Source(d, "val", frame_prefix="")
    assert source[0] == {"video": ["20/1.jpg", "20/2.jpg"], "label": 2} and source.missing == 1


# ----------------------------------------------------------------------------
# 2. segment sampling (PySlowFast's get_seq_frames, expected values worked out by hand)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("n, t, expected", [
    # seg = 4/8 = 0.5: bounds round(0, .5, 1, 1.5, 2, 2.5, 3, 3.5, 4) = 0 0 1 2 2 2 3 4 4 (halves to even)
    (5, 8, [0, 0, 1, 2, 2, 2, 3, 4]),
    (1, 4, [0, 0, 0, 0]),
    # seg = 2: bounds 0 2 4 ... 16, middles 1 3 ... 15
    (17, 8, [1, 3, 5, 7, 9, 11, 13, 15]),
    # seg = 15/8: bounds 0 2 4 6 8 9 11 13 15 (7.5 -> 8)
    (16, 8, [1, 3, 5, 7, 8, 10, 12, 14]),
    # seg = 2.5: bounds 0 2 5 (2.5 -> 2; rounding halves up would give 1, 3 -> 1, 4)
    (6, 2, [1, 3]),
    # seg = 12.25: bounds 0 12 24 37 49 (24.5 -> 24; halves up would give 30 -> 31)
    (50, 4, [6, 18, 30, 43]),
])
def test_segment_indices_test_mode(n, t, expected):
    got = ssv2.segment_indices(n, t, training=False)
    assert got.dtype == np.int64 and got.tolist() == expected


def test_segment_indices_train_mode_covers_each_segment():
    rng = np.random.default_rng(0)
    draws = np.stack([ssv2.segment_indices(50, 4, training=True, rng=rng) for _ in range(2000)])
    # segments [0, 12], [12, 24], [24, 37], [37, 49]: both ends included
    assert draws.min(axis=0).tolist() == [0, 12, 24, 37] and draws.max(axis=0).tolist() == [12, 24, 37, 49]
    again = [ssv2.segment_indices(50, 4, training=True, rng=np.random.default_rng(3)) for _ in range(2)]
    assert again[0].tolist() == again[1].tolist()
    short = np.stack([ssv2.segment_indices(3, 6, training=True, rng=rng) for _ in range(500)])
    assert short.min() == 0 and short.max() == 2     # short video: repeated frames, never past the end


def test_segment_indices_reject_bad_arguments():
    with pytest.raises(ValueError, match="num_video_frames"):
        ssv2.segment_indices(0, 4, training=False)
    with pytest.raises(ValueError, match="num_frames"):
        ssv2.segment_indices(10, 0, training=False)
    with pytest.raises(ValueError, match="rng"):
        ssv2.segment_indices(10, 4, training=True)


# ----------------------------------------------------------------------------
# 3. decoding
# ----------------------------------------------------------------------------

def test_decode_segments_webm_and_frame_list(tmp_path):
    clip = index_clip(21)
    path = encode_clip(tmp_path / "7.webm", clip)
    frames, ok = ssv2.decode_segments(path, 8, training=False)
    assert ok and frames.shape == (8, 32, 48, 3)
    assert frame_ids(frames) == ssv2.segment_indices(21, 8, training=False).tolist()
    frames, ok = ssv2.decode_segments(path, 8, training=True, rng=np.random.default_rng(5), short_side=16)
    assert ok and frames.shape == (8, 16, 24, 3)
    assert frame_ids(frames) == ssv2.segment_indices(21, 8, training=True, rng=np.random.default_rng(5)).tolist()
    paths = []
    for i, image in enumerate(clip[:13]):
        paths.append(str(tmp_path / f"{i:06d}.png"))
        Image.fromarray(image).save(paths[-1])
    frames, ok = ssv2.decode_segments(paths, 4, training=False)
    assert ok and frame_ids(frames) == ssv2.segment_indices(13, 4, training=False).tolist() == [1, 4, 7, 10]


def test_decode_segments_bad_video_is_blank_and_invalid(tmp_path, caplog):
    corrupt = tmp_path / "corrupt.webm"
    corrupt.write_bytes(b"\x1a\x45\xdf\xa3 not a video")
    for video in (str(tmp_path / "missing.webm"), str(corrupt), [str(tmp_path / "missing.jpg")]):
        frames, ok = ssv2.decode_segments(video, 4, training=False, short_side=16)
        assert not ok and frames.shape == (4, 16, 16, 3) and not frames.any()
    with pytest.raises(ValueError, match="rng"):
        ssv2.decode_segments(str(corrupt), 4, training=True)


# ----------------------------------------------------------------------------
# 4. the demo set
# ----------------------------------------------------------------------------

DEMO = dict(num_train=16, num_val=8, min_frames=10, max_frames=20, size=32, seed=0)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ssv2_demo"))
    argv = ["--out", d] + [f"--{k}={v}" for k, v in DEMO.items()]
    assert make_ssv2_demo.main(argv) == 0
    return d


def test_demo_in_official_formats_and_balanced(demo_dir):
    with open(os.path.join(demo_dir, ssv2.LABELS_FILE)) as f:
        raw_labels = json.load(f)
    assert raw_labels == {"Moving something from left to right": "0", "Moving something from right to left": "1",
                          "Moving something up": "2", "Moving something down": "3"}
    with open(os.path.join(demo_dir, ssv2.ANNOTATION_FILES["train"])) as f:
        entries = json.load(f)
    assert set(entries[0]) == {"id", "label", "template", "placeholders"}
    assert all(e["label"] == e["template"].replace("[something]", e["placeholders"][0]).lower() for e in entries)
    train, val = ssv2.Ssv2Source(demo_dir, "train"), ssv2.Ssv2Source(demo_dir, "validation")
    assert (len(train), len(val), train.missing, val.missing, train.num_classes) == (16, 8, 0, 0, 4)
    assert collections.Counter(train[i]["label"] for i in range(16)) == {0: 4, 1: 4, 2: 4, 3: 4}
    assert collections.Counter(val[i]["label"] for i in range(8)) == {0: 2, 1: 2, 2: 2, 3: 2}
    paths = [s[i]["video"] for s in (train, val) for i in range(len(s))]
    assert len(set(paths)) == 24 and all(p.endswith(".webm") for p in paths)
    lengths = []
    for p in paths[:8]:
        with av.open(p) as c:
            assert c.streams.video[0].codec_context.name == "vp9"
            lengths.append(sum(1 for _ in c.decode(video=0)))
    assert min(lengths) >= 10 and max(lengths) <= 20 and len(set(lengths)) > 1


def _centroids(clip):
    """Per-frame brightness centroid ``(y, x)`` of a ``(T, H, W, 3)`` clip."""
    mass = clip.astype(np.float64).sum(-1)
    ys, xs = np.mgrid[:clip.shape[1], :clip.shape[2]]
    total = mass.sum(axis=(1, 2))
    return (mass * ys).sum(axis=(1, 2)) / total, (mass * xs).sum(axis=(1, 2)) / total


def test_demo_digits_move_in_the_labelled_direction(demo_dir):
    source = ssv2.Ssv2Source(demo_dir, "train")
    room = DEMO["size"] // 2
    for i in range(len(source)):
        clip, ok = ssv2.decode_segments(source[i]["video"], 8, training=False)
        assert ok and clip.shape == (8, 32, 32, 3)
        y, x = _centroids(clip)
        along, across = {0: (x, y), 1: (-x, y), 2: (-y, x), 3: (y, x)}[source[i]["label"]]
        steps = np.diff(along)
        # moves at least 60% of the free room along its direction, one way only, and drifts less sideways
        assert along[-1] - along[0] > 0.45 * room and (steps > -0.5).all(), (i, along)
        assert abs(across[-1] - across[0]) < 0.5 * (along[-1] - along[0]), (i, across)
        flipped_x = _centroids(clip[:, :, ::-1])[1]
        if source[i]["label"] in (0, 1):                # a flip reverses a horizontal motion: the other class
            assert np.sign(flipped_x[-1] - flipped_x[0]) == -np.sign(x[-1] - x[0])


def test_demo_is_deterministic_and_written_once(demo_dir, tmp_path):
    again = make_ssv2_demo.make_ssv2_demo(str(tmp_path / "again"), **DEMO)
    other = make_ssv2_demo.make_ssv2_demo(str(tmp_path / "other"), **{**DEMO, "seed": 1})
    names = sorted(os.listdir(os.path.join(demo_dir, ssv2.VIDEO_DIR)))
    assert names == sorted(os.listdir(os.path.join(again, ssv2.VIDEO_DIR)))
    for rel in [ssv2.ANNOTATION_FILES["train"], ssv2.LABELS_FILE] + [os.path.join(ssv2.VIDEO_DIR, n) for n in names]:
        with open(os.path.join(demo_dir, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    with open(os.path.join(demo_dir, ssv2.VIDEO_DIR, "1.webm"), "rb") as a, \
            open(os.path.join(other, ssv2.VIDEO_DIR, "1.webm"), "rb") as b:
        assert a.read() != b.read()
    stamp = os.path.getmtime(os.path.join(demo_dir, ssv2.LABELS_FILE))
    assert make_ssv2_demo.ensure_ssv2_demo(demo_dir, size=3) == demo_dir    # present: not rewritten
    assert os.path.getmtime(os.path.join(demo_dir, ssv2.LABELS_FILE)) == stamp
    with pytest.raises(ValueError, match="size"):
        make_ssv2_demo.make_ssv2_demo(str(tmp_path / "bad"), **{**DEMO, "size": 3})


def test_demo_falls_back_to_mp4_without_a_webm_encoder(tmp_path, monkeypatch):
    monkeypatch.setattr(make_ssv2_demo, "_WEBM_CODECS", (("no-such-encoder", {}),))
    assert make_ssv2_demo.pick_webm_codec()[2] == "mp4"
    d = make_ssv2_demo.make_ssv2_demo(str(tmp_path), **{**DEMO, "num_train": 4, "num_val": 4})
    source = ssv2.Ssv2Source(d, "train")
    assert len(source) == 4 and source.missing == 0 and source[0]["video"].endswith("1.mp4")
    clip, ok = ssv2.decode_segments(source[0]["video"], 4, training=False)
    assert ok and clip.shape == (4, 32, 32, 3)
