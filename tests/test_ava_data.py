"""AVA data: the embedded demo set read back through the official-format readers, the keyframe
source, the box-aware train / eval geometry against hand-placed content, padding, coverage of
every val keyframe, and determinism."""
import os
import shutil

import grain
import numpy as np
import pytest

from maskfeat_jax.data import ava, ava_geometry, ava_maps, make_ava_demo

av = pytest.importorskip("av")

DEMO = dict(num_train=8, num_val=4, seconds=10, size=64, seed=0)
FPS = make_ava_demo.FPS
PERSONS = lambda n: [1 + i % 3 for i in range(n)]           # noqa: E731 - persons of video i
KEYFRAMES = list(range(902, 909))                           # seconds 902 .. 900 + 10 - 2


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ava_demo"))
    assert make_ava_demo.main(["--out", d] + [f"--{k}={v}" for k, v in DEMO.items()]) == 0
    return d


def _ann(root, name):
    return os.path.join(root, ava.ANNOTATION_DIR, ava.FILES[name])


def _frames(root, video):
    with av.open(os.path.join(root, ava.VIDEO_DIR, f"{video}.mp4")) as c:
        assert c.streams.video[0].average_rate == FPS
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def _person_ids(root, split):
    """``{(video, second, box key): person id}`` from the ground-truth CSV."""
    rows = ava.read_annotations(_ann(root, f"{split}_groundtruth"))
    return {(rows.video[i], int(rows.second[i]), rows.box_keys[i]): int(rows.value[i]) for i in range(len(rows))}


# ---------------------------------------------------------------------------------------------
# The demo files
# ---------------------------------------------------------------------------------------------

def test_demo_files_read_back_with_exact_counts(demo_dir):
    assert ava.read_label_map(_ann(demo_dir, "label_map")) == {a: make_ava_demo.ACTIONS[a] for a in range(1, 7)}
    for split, n in (("train", 8), ("val", 4)):
        rows = ava.read_annotations(_ann(demo_dir, f"{split}_groundtruth"))
        records, counts = ava.keyframes([rows])
        assert counts["keyframes"] == n * len(KEYFRAMES) and counts["boxes"] == len(KEYFRAMES) * sum(PERSONS(n))
        assert counts["rows"] == len(rows) == sum(int(r.labels.sum()) for r in records.values())
        assert counts["clipped"] == counts["outside_valid"] == 0
        people = _person_ids(demo_dir, split)
        for i, video in enumerate(make_ava_demo.video_ids(split, n)):
            for s in KEYFRAMES:
                ids = sorted({p for (v, sec, _), p in people.items() if (v, sec) == (video, s)})
                assert ids == list(range(PERSONS(n)[i])), (video, s)
        for key, record in records.items():
            for labels in record.labels:
                acts = set((np.flatnonzero(labels) + 1).tolist())
                assert len(acts & {6, 7}) == 1 and acts <= set(range(1, 8)), (key, acts)
                assert (5 in acts) != bool(acts & {1, 2, 3, 4}) and not {1, 2} <= acts and not {3, 4} <= acts
        assert all(len(_frames(demo_dir, v)) == 10 * FPS for v in make_ava_demo.video_ids(split, n)[:2])
    val_det = ava.read_detections(_ann(demo_dir, "val_detections"))
    assert (val_det.action == -1).all() and (val_det.value < 0.8).any() and (val_det.value >= 0.8).any()
    train_det = ava.read_detections(_ann(demo_dir, "train_detections"))
    assert (train_det.action == -1).any() and (train_det.action > 0).any()


def test_demo_labels_follow_the_digit_motion(demo_dir):
    """Between frames k - 2 and k + 2 around keyframe frame k, a person's centroid (its colour
    channel, near its box) moves at least 4 px in each labelled direction and under 2 px along an
    axis it does not move on; its box holds most of its ink at the keyframe."""
    rows = ava.read_annotations(_ann(demo_dir, "train_groundtruth"))
    people = {}                                               # (video, second, key) -> (person, box, actions)
    for i in range(len(rows)):
        key = (rows.video[i], int(rows.second[i]), rows.box_keys[i])
        people.setdefault(key, (int(rows.value[i]), rows.boxes[i], set()))[2].add(int(rows.action[i]))
    checked = dict.fromkeys(range(1, 6), 0)
    for video in make_ava_demo.video_ids("train", 8):
        frames = _frames(demo_dir, video).astype(np.float64)
        for (v, s, _), (p, box, acts) in people.items():
            if v != video:
                continue
            k = (s - 900) * FPS
            x1, y1, x2, y2 = np.round(box * 64).astype(int)
            ys, xs = np.mgrid[max(y1 - 10, 0):min(y2 + 10, 64), max(x1 - 10, 0):min(x2 + 10, 64)]

            def centroid(f):
                m = frames[f, ys, xs, p]
                return np.array([(m * xs).sum(), (m * ys).sum()]) / m.sum()

            d = centroid(k + 2) - centroid(k - 2)
            want = np.array([-1 if 1 in acts else 1 if 2 in acts else 0, -1 if 3 in acts else 1 if 4 in acts else 0])
            assert np.all(np.where(want != 0, d * want >= 4, np.abs(d) < 2)), (video, s, p, acts, d)
            ink = frames[k, :, :, p]
            assert ink[y1:y2, x1:x2].sum() > 0.75 * ink.sum(), (video, s, p)
            for a in acts & set(checked):
                checked[a] += 1
    assert sum(checked.values()) >= 105 and min(checked.values()) >= 3, checked    # every box, every motion class


def test_excluded_timestamps_are_in_the_files_and_dropped(demo_dir):
    excluded = ava.read_exclusions(_ann(demo_dir, "val_exclusions"))
    assert excluded == {("val000", 903), ("val003", 908)}
    gt = ava.read_annotations(_ann(demo_dir, "val_groundtruth"))
    det = ava.read_detections(_ann(demo_dir, "val_detections"))
    for key in excluded:                                      # the rows are there ...
        assert key in set(zip(gt.video, gt.second.tolist())) and key in set(zip(det.video, det.second.tolist()))
    source = ava_maps.AvaSource("val", demo_dir)              # ... and the source drops them
    keys = {(source.videos[source[i]["video_index"]], source[i]["second"]) for i in range(len(source))}
    assert not keys & excluded and source.counts["excluded"] == sum(
        (v, s) in excluded and score >= 0.8 for v, s, score in zip(det.video, det.second.tolist(), det.value))
    truth, class_ids, evaluator_excluded = ava_maps.groundtruth(demo_dir)
    assert evaluator_excluded == excluded and class_ids == [1, 2, 3, 4, 5, 6]
    assert len(truth) == 4 * len(KEYFRAMES) and excluded <= set(truth)


def test_sources_take_the_official_boxes(demo_dir):
    train = ava_maps.AvaSource("train", demo_dir)
    gt_only = ava_maps.AvaSource("train", demo_dir, detections=False)
    det = ava.read_detections(_ann(demo_dir, "train_detections"))
    kept = {(v, s, k) for v, s, k, score in zip(det.video, det.second.tolist(), det.box_keys, det.value)
            if score >= 0.8}
    assert train.counts["boxes"] == gt_only.counts["boxes"] + len(kept) == 105 + len(kept) and len(kept) > 10
    assert len(train) == len(gt_only) == 56 and train.counts["below_threshold"] > 0
    item = train[0]
    assert set(item) == {"video", "video_index", "second", "boxes", "labels", "scores"}
    assert np.isnan(gt_only[0]["scores"]).all() and any(not np.isnan(train[i]["scores"]).all() for i in range(56))
    negatives = [i for i in range(len(train)) if (train[i]["labels"].sum(1) == 0).any()]
    assert negatives                                          # detections without an action: negatives
    val = ava_maps.AvaSource("val", demo_dir)
    assert all((val[i]["scores"] >= 0.8).all() and val[i]["labels"].sum() == 0 for i in range(len(val)))


def test_keyframe_clip_frames_are_the_official_indices(demo_dir):
    path = os.path.join(demo_dir, ava.VIDEO_DIR, "train001.mp4")
    frames = _frames(demo_dir, "train001")
    for s in (902, 905, 908):
        clip, ok = ava_maps.decode_keyframe_clip(path, s, 8, 2, fps=FPS)
        assert ok and np.array_equal(clip, frames[ava.clip_indices(s, 8, 2, 60, fps=FPS)])
    # on a 30 fps timeline, the frames shown at those instants: index // 5 of the 6 fps video
    clip, ok = ava_maps.decode_keyframe_clip(path, 904, 4, 5, fps=30)
    assert ok and np.array_equal(clip, frames[[22, 23, 24, 25]])


# ---------------------------------------------------------------------------------------------
# Geometry on hand-placed content
# ---------------------------------------------------------------------------------------------

def _painted(height, width, boxes_px, frames=2):
    """Frames with box ``i`` filled in colour channel ``i`` (integer pixel edges)."""
    clip = np.zeros((frames, height, width, 3), np.uint8)
    for i, (x1, y1, x2, y2) in enumerate(boxes_px):
        clip[:, y1:y2, x1:x2, i] = 255
    return clip


def _assert_boxes_hold_their_content(frames, boxes, tol):
    """Each box ``i``'s colour lies inside it, and it spans its colour, to ``tol`` pixels."""
    for i, (x1, y1, x2, y2) in enumerate(boxes):
        ys, xs = np.nonzero(frames[0, :, :, i] > 127)
        assert len(xs), i
        got = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        np.testing.assert_allclose(got, [x1, y1, x2, y2], atol=tol, err_msg=f"box {i}")


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_train_geometry_boxes_follow_the_content(flip_p):
    """Asymmetric boxes on a 48 x 80 frame, short side jittered to 64, random 48 crop, flipped or
    not: what is left of each box's content in view stays in its clipped box (the official
    pixel-index flip puts boxes 1 px to the left)."""
    boxes_px = [(12, 4, 30, 40), (40, 20, 52, 30), (56, 8, 70, 44)]
    frames = _painted(48, 80, boxes_px)
    norm = np.asarray(boxes_px, np.float32) / [80, 48, 80, 48]
    for seed in range(6):
        rng = np.random.default_rng(seed)
        out, boxes, clipped, outside = ava_geometry.train_geometry(frames, ava_geometry.to_pixels(norm, 48, 80), rng, 48,
                                                               (64, 64), flip_p=flip_p)
        assert out.shape == (2, 48, 48, 3) and boxes.dtype == np.float32
        inside = [i for i, b in enumerate(boxes) if b[2] - b[0] > 2 and b[3] - b[1] > 2]    # some left in view
        assert inside
        shift = np.float32([1, 0, 1, 0]) if flip_p else 0     # where the official flip puts the box
        _assert_boxes_hold_their_content(out[:, :, :, inside], boxes[inside] + shift, tol=1.5)


def test_train_geometry_clips_and_counts_boxes():
    """96-wide frame, 48 crop (no resize): a left box is cut when the crop starts past 0 and
    emptied past 24; a right box is always cut and emptied unless the crop starts past 25;
    flipping mirrors the clipped boxes exactly."""
    frames = np.zeros((1, 48, 96, 3), np.uint8)
    frames[..., 0] = np.arange(96, dtype=np.uint8)            # red = column: reveals the crop offset
    left, right = [0, 10, 24, 30], [72, 10, 96, 30]
    norm = np.asarray([left, right], np.float32) / [96, 48, 96, 48]
    seen = set()
    for seed in range(40):
        out, boxes, clipped, outside = ava_geometry.train_geometry(
            frames, ava_geometry.to_pixels(norm, 48, 96), np.random.default_rng(seed), 48, (48, 48), flip_p=0.0)
        x = int(out[0, 0, 0, 0])
        want = np.clip(np.float32([[0 - x, 10, 24 - x, 30], [72 - x, 10, 95 - x, 30]]), 0, 47)
        np.testing.assert_allclose(boxes, want, atol=1e-4)
        assert clipped == 1 + (x > 0) and outside == (x >= 24) + (x <= 25), x
        seen.add((x > 0, x >= 24, x <= 25))
        # the same draws, flipped: the frame mirrored, boxes x1, x2 -> 47 - x2, 47 - x1 (official)
        flipped, fboxes, fclipped, foutside = ava_geometry.train_geometry(
            frames, ava_geometry.to_pixels(norm, 48, 96), np.random.default_rng(seed), 48, (48, 48), flip_p=1.0)
        np.testing.assert_array_equal(flipped, out[:, :, ::-1])
        np.testing.assert_allclose(fboxes, np.stack([47 - want[:, 2], want[:, 1], 47 - want[:, 0], want[:, 3]], 1),
                                   atol=1e-4)
        assert (fclipped, foutside) == (clipped, outside)
    assert len(seen) >= 2                                     # several cases drawn


def test_eval_geometry_is_short_side_and_centre_crop():
    """48 x 80 -> short side 32 (32 x 53), centre crop 32 at x = ceil(21 / 2) = 11."""
    boxes_px = [(24, 6, 42, 42), (0, 12, 18, 36), (72, 0, 80, 30)]
    frames = _painted(48, 80, boxes_px)
    norm = np.asarray(boxes_px, np.float32) / [80, 48, 80, 48]
    out, boxes, clipped, outside = ava_geometry.eval_geometry(frames, ava_geometry.to_pixels(norm, 48, 80), 32)
    assert out.shape == (2, 32, 32, 3)
    scale = np.float32([53 / 80, 32 / 48, 53 / 80, 32 / 48])
    want = np.float32([[24, 6, 42, 42], [0, 12, 18, 36], [72, 0, 79, 30]])     # x2 = W clipped to W - 1 first
    want = np.clip(want * scale - [11, 0, 11, 0], 0, 31)
    np.testing.assert_allclose(boxes, want, atol=1e-4)
    assert want[2, 0] == want[2, 2] == 31 and 0 < want[1, 2] < 1
    assert (clipped, outside) == (2, 1)                       # box 1 cut, box 2 left the crop
    _assert_boxes_hold_their_content(out[:, :, :, :1], boxes[:1], tol=1.0)


# ---------------------------------------------------------------------------------------------
# The maps on the demo
# ---------------------------------------------------------------------------------------------

def _train_map(**kw):
    return ava_maps.AvaTrainMap(8, 1, 64, kw.pop("max_boxes", 6), jitter_scales=(73, 91), fps=FPS, **kw)


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_train_map_boxes_hold_their_digit(demo_dir, flip_p):
    """Ground-truth boxes through decode, jitter, crop and flip: at the keyframe (clip frame
    T // 2) each box holds most of its person's ink (its colour channel) within 1 px."""
    source = ava_maps.AvaSource("train", demo_dir, detections=False)
    people = _person_ids(demo_dir, "train")
    m = _train_map(flip_p=flip_p)
    for i in range(0, len(source), 5):
        item = source[i]
        out = m.random_map(item, np.random.default_rng(i))
        video = source.videos[item["video_index"]]
        keys = [",".join(f"{c:.3f}" for c in b) for b in item["boxes"]]
        frame = out["image"][4].astype(np.float64)
        for j in np.flatnonzero(out["box_valid"]):
            p = people[(video, item["second"], keys[j])]
            x1, y1, x2, y2 = out["boxes"][j] + ([1, 0, 1, 0] if flip_p else 0)
            ink = frame[:, :, p]
            if x2 - x1 < 8 or y2 - y1 < 8 or ink.sum() < 2000:   # mostly cropped away
                continue
            held = ink[max(int(y1) - 1, 0):int(np.ceil(y2)) + 1, max(int(x1) - 1, 0):int(np.ceil(x2)) + 1].sum()
            assert held > 0.75 * ink.sum(), (i, j, p, flip_p)
        assert out["valid"] and out["num_boxes"] == len(item["boxes"]) == out["box_valid"].sum()


def test_train_map_pads_truncates_and_marks_valid_boxes(demo_dir):
    source = ava_maps.AvaSource("train", demo_dir)
    item = dict(source[int(np.argmax([len(source[i]["boxes"]) for i in range(len(source))]))])
    n = len(item["boxes"])
    assert n >= 4
    out = _train_map(max_boxes=n + 3).random_map(item, np.random.default_rng(0))
    assert out["box_valid"].tolist() == [True] * n + [False] * 3 and out["boxes_truncated"] == 0
    np.testing.assert_array_equal(out["labels"][:n], item["labels"])
    assert out["labels"].dtype == np.float32 and not out["labels"][n:].any() and not out["boxes"][n:].any()
    assert out["boxes"].shape == (n + 3, 4) and (out["boxes"] >= 0).all() and (out["boxes"] <= 63).all()
    short = _train_map(max_boxes=n - 2).random_map(item, np.random.default_rng(0))
    assert short["box_valid"].all() and short["boxes_truncated"] == 2 and short["num_boxes"] == n
    np.testing.assert_array_equal(short["boxes"], out["boxes"][:n - 2])


def test_train_map_is_deterministic_given_a_seed(demo_dir):
    source = ava_maps.AvaSource("train", demo_dir)

    def items(seed):
        ds = grain.MapDataset.source(source).seed(seed).random_map(_train_map())
        return [ds[i] for i in range(0, len(source), 7)]

    a, b, c = items(0), items(0), items(1)
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert any(not np.array_equal(x["boxes"], z["boxes"]) for x, z in zip(a, c))


def test_eval_items_cover_every_val_keyframe_exactly_once(demo_dir):
    source = ava_maps.AvaSource("val", demo_dir)
    det = ava.read_detections(_ann(demo_dir, "val_detections"))
    want, _ = ava.keyframes(detections=[det], excluded=ava.read_exclusions(_ann(demo_dir, "val_exclusions")))
    assert len(want) >= 20
    m = ava_maps.AvaEvalMap(8, 1, 64, max_boxes=4, fps=FPS)
    seen, per_process = [], []
    for pi in range(2):
        batches = list(ava_maps.eval_batches(source, m, 5, process_index=pi, process_count=2))
        per_process.append(len(batches))
        for batch in batches:
            assert batch["image"].shape == (5, 8, 64, 64, 3) and batch["boxes"].shape == (5, 4, 4)
            for r in range(5):
                if batch["video_index"][r] < 0:                   # padding
                    assert not batch["valid"][r] and not batch["box_valid"][r].any() and batch["second"][r] == -1
                    continue
                key = (source.videos[batch["video_index"][r]], int(batch["second"][r]))
                seen.append(key)
                n = len(want[key].boxes)
                assert batch["valid"][r] and batch["box_valid"][r].tolist() == [True] * n + [False] * (4 - n)
                np.testing.assert_array_equal(batch["ori_boxes"][r, :n], want[key].boxes)
                assert (batch["box_scores"][r, :n] >= 0.8).all()
    assert per_process[0] == per_process[1] == 3
    assert sorted(seen) == sorted(want) and len(seen) == len(set(seen))


def test_missing_and_undecodable_videos_are_skipped_and_counted(demo_dir, tmp_path):
    root = tmp_path / "ava"
    shutil.copytree(demo_dir, root)
    os.remove(root / ava.VIDEO_DIR / "train003.mp4")
    (root / ava.VIDEO_DIR / "train004.mp4").write_bytes(b"not a video")
    source = ava_maps.AvaSource("train", str(root))
    assert source.counts["missing_videos"] == 1 and source.counts["missing_keyframes"] == len(KEYFRAMES)
    assert len(source) == 56 - len(KEYFRAMES) and "train003" not in source.videos
    broken = [i for i in range(len(source)) if source.videos[source[i]["video_index"]] == "train004"]
    out = _train_map().random_map(source[broken[0]], np.random.default_rng(0))
    assert not out["valid"] and not out["box_valid"].any() and not out["image"].any()
    assert out["image"].shape == (8, 64, 64, 3) and out["num_boxes"] == len(source[broken[0]]["boxes"])
    ok = _train_map().random_map(source[0], np.random.default_rng(0))
    assert ok["valid"] and ok["image"].any()


def test_train_map_plugs_into_the_training_stream(demo_dir):
    import ml_collections
    from maskfeat_jax.data import pipeline
    config = ml_collections.ConfigDict({"seed": 3, "input": {"worker_count": 0, "prefetch": 2}})
    source = ava_maps.AvaSource("train", demo_dir)

    def first(n):
        it = iter(pipeline.train_stream(config, source, _train_map(global_batch_size=4)))
        return [next(it) for _ in range(n)]

    a, b = first(2), first(2)
    assert a[0]["image"].shape == (4, 8, 64, 64, 3) and a[0]["labels"].shape == (4, 6, 80)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


# ---------------------------------------------------------------------------------------------
# Writer
# ---------------------------------------------------------------------------------------------

def test_demo_is_deterministic_and_written_once(demo_dir, tmp_path):
    again = make_ava_demo.make_ava_demo(str(tmp_path / "again"), **DEMO)
    other = make_ava_demo.make_ava_demo(str(tmp_path / "other"), **{**DEMO, "seed": 1})
    files = sorted(os.path.relpath(os.path.join(d, f), demo_dir) for d, _, fs in os.walk(demo_dir) for f in fs)
    assert len(files) == 12 + 6
    for rel in files:
        with open(os.path.join(demo_dir, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel
    for rel in (os.path.join(ava.VIDEO_DIR, "train000.mp4"),
                os.path.join(ava.ANNOTATION_DIR, ava.FILES["val_detections"])):
        with open(os.path.join(demo_dir, rel), "rb") as a, open(os.path.join(other, rel), "rb") as b:
            assert a.read() != b.read(), rel
    stamp = os.path.getmtime(_ann(demo_dir, "label_map"))
    assert make_ava_demo.ensure_ava_demo(demo_dir, size=3) == demo_dir      # present: not rewritten
    assert os.path.getmtime(_ann(demo_dir, "label_map")) == stamp
    for bad in ({"size": 30}, {"seconds": 4}, {"num_val": 0}):
        with pytest.raises(ValueError):
            make_ava_demo.make_ava_demo(str(tmp_path / "bad"), **{**DEMO, **bad})
