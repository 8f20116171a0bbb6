"""AVA building blocks: the file readers and keyframe records, the clip frame indices, RoIAlign
against a loop-level numpy reference written from torchvision's definition
(``references.ref_roi_align``), and frame-mAP against hand-computed values and a loop-level
transcription of the official algorithm."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maskfeat_jax.data import ava
from maskfeat_jax.evaluators import ava_map
from maskfeat_jax.models.roi_align import roi_align
from references import ref_roi_align


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Readers and keyframe records
# ---------------------------------------------------------------------------------------------

GT_CSV = """\
vidA,0902,0.1,0.2,0.5,0.9,12,0
vidA,0902,0.1,0.2,0.5,0.9,80,0
vidA,0902,0.6,0.1,0.9,0.8,1,1
vidA,0903,0.0,0.0,1.0,1.0,14,2

vidB,1798,0.2,0.2,0.4,0.4,17
vidB,0901,0.2,0.2,0.4,0.4,17,0
vidB,1799,0.2,0.2,0.4,0.4,17,0
"""

DET_CSV = """\
vidA,0902,0.1,0.2,0.5,0.9,,0.95
vidA,0902,0.3,0.3,0.4,0.4,,0.80
vidA,0903,0.2,0.2,0.3,0.3,5,0.79
vidA,0904,0.2,0.2,0.3,0.3,-1,0.99
vidC,1000,0.2,0.2,0.3,0.3,9,0.9
"""


def test_read_annotations_exact_rows(tmp_path):
    rows = ava.read_annotations(_write(tmp_path, "gt.csv", GT_CSV))
    assert rows.video == ["vidA"] * 4 + ["vidB"] * 3
    np.testing.assert_array_equal(rows.second, [902, 902, 902, 903, 1798, 901, 1799])
    np.testing.assert_array_equal(rows.action, [12, 80, 1, 14, 17, 17, 17])
    np.testing.assert_allclose(rows.boxes[2], [0.6, 0.1, 0.9, 0.8], rtol=1e-7)
    assert rows.boxes.dtype == np.float32 and rows.boxes.shape == (7, 4)
    np.testing.assert_array_equal(rows.value[:4], [0, 0, 1, 2])
    assert math.isnan(rows.value[4])                  # the 7-field row has no person id
    assert rows.box_keys[0] == "0.1,0.2,0.5,0.9" and rows.clipped == 0


def test_read_detections_scores_and_negatives(tmp_path):
    rows = ava.read_detections(_write(tmp_path, "det.csv", DET_CSV))
    np.testing.assert_array_equal(rows.action, [-1, -1, 5, -1, 9])
    np.testing.assert_allclose(rows.value, [0.95, 0.80, 0.79, 0.99, 0.9])


def test_training_keyframes_merge_boxes_threshold_and_valid_seconds(tmp_path):
    gt = ava.read_annotations(_write(tmp_path, "gt.csv", GT_CSV))
    det = ava.read_detections(_write(tmp_path, "det.csv", DET_CSV))
    records, counts = ava.keyframes([gt], [det], excluded={("vidC", 1000)})
    assert list(records) == [("vidA", 902), ("vidA", 903), ("vidA", 904), ("vidB", 1798)]
    frame = records[("vidA", 902)]
    # GT box 1 (actions 12 and 80, merged; its detected copy adds no label), GT box 2 (action 1),
    # then the detection at exactly the 0.8 threshold (kept, a negative).
    np.testing.assert_allclose(frame.boxes, [[0.1, 0.2, 0.5, 0.9], [0.6, 0.1, 0.9, 0.8], [0.3, 0.3, 0.4, 0.4]])
    assert frame.labels.shape == (3, 80) and frame.labels.dtype == np.uint8
    assert [list(np.flatnonzero(r) + 1) for r in frame.labels] == [[12, 80], [1], []]
    # Second 903: its GT box only (the detection there scores 0.79); 904: a negative detection.
    assert [list(np.flatnonzero(r) + 1) for r in records[("vidA", 903)].labels] == [[14]]
    assert records[("vidA", 904)].labels.shape == (1, 80) and records[("vidA", 904)].labels.sum() == 0
    assert counts == {"rows": 8, "clipped": 0, "below_threshold": 1, "outside_valid": 2, "excluded": 1,
                      "keyframes": 4, "boxes": 6}


def test_eval_keyframes_use_detections_only(tmp_path):
    det = ava.read_detections(_write(tmp_path, "det.csv", DET_CSV))
    records, counts = ava.keyframes(detections=[det], excluded={("vidA", 904)})
    assert list(records) == [("vidA", 902), ("vidC", 1000)]
    np.testing.assert_allclose(records[("vidA", 902)].boxes, [[0.1, 0.2, 0.5, 0.9], [0.3, 0.3, 0.4, 0.4]])
    assert counts["below_threshold"] == 1 and counts["excluded"] == 1
    higher, _ = ava.keyframes(detections=[det], score_thresh=0.9)
    assert len(higher[("vidA", 902)].boxes) == 1


def test_second_stride_keeps_multiples(tmp_path):
    gt = ava.read_annotations(_write(tmp_path, "gt.csv", GT_CSV))
    records, _ = ava.keyframes([gt], second_stride=2)
    assert list(records) == [("vidA", 902), ("vidB", 1798)]


def test_clipped_boxes_are_clipped_and_counted(tmp_path):
    text = "v,0902,-0.1,0.2,1.2,0.9,3,0\nv,0902,0.1,0.2,0.5,1.0000001,3,1\nv,0903,0.1,0.2,0.5,0.9,3,0\n"
    rows = ava.read_annotations(_write(tmp_path, "gt.csv", text))
    assert rows.clipped == 2
    np.testing.assert_allclose(rows.boxes[:2], [[0.0, 0.2, 1.0, 0.9], [0.1, 0.2, 0.5, 1.0]])
    _, counts = ava.keyframes([rows])
    assert counts["clipped"] == 2


@pytest.mark.parametrize("bad, reader", [
    ("v,0902,0.1,0.2,0.5,0.9", "read_annotations"),              # too few fields
    ("v,0902,0.1,0.2,0.5,0.9,3,0,7", "read_annotations"),        # too many
    ("v,0902,0.1,zero,0.5,0.9,3,0", "read_annotations"),         # not a number
    ("v,09.5,0.1,0.2,0.5,0.9,3,0", "read_annotations"),          # fractional second
    ("v,0902,0.1,0.2,0.5,0.9,,0", "read_annotations"),           # ground truth needs an action
    ("v,0902,0.1,0.2,0.5,0.9,81,0", "read_annotations"),         # action id out of 1..80
    ("v,0902,0.1,0.2,nan,0.9,3,0", "read_annotations"),          # non-finite coordinate
    ("v,0902,0.1,0.2,0.5,0.9,3", "read_detections"),             # detections need a score
    ("v,0902,0.1,0.2,0.5,0.9,,high", "read_detections"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, reader):
    path = _write(tmp_path, "rows.csv", f"v,0902,0.1,0.2,0.5,0.9,3,0.9\n\n{bad}\n")
    with pytest.raises(ValueError, match=r"rows\.csv:3: "):
        getattr(ava, reader)(path)


LABEL_MAP = """\
item {
  name: "bend/bow (at the waist)"
  id: 1
}
item {
  name: "crouch/kneel"
  label_id: 3
}
"""


def test_read_label_map(tmp_path):
    assert ava.read_label_map(_write(tmp_path, "map.pbtxt", LABEL_MAP)) == {1: "bend/bow (at the waist)",
                                                                           3: "crouch/kneel"}


@pytest.mark.parametrize("text, line", [
    (LABEL_MAP + "item {\n  name: \"x\"\n}\n", 11),               # item without an id
    (LABEL_MAP + "item {\n  name: \"x\"\n  id: 3\n}\n", 12),       # id seen before
    (LABEL_MAP.replace("id: 1", "id: one"), 3),                  # not a number
    (LABEL_MAP.replace("item {", "itme {", 1), 1),
])
def test_label_map_errors_name_the_line(tmp_path, text, line):
    with pytest.raises(ValueError, match=rf"map\.pbtxt:{line}: "):
        ava.read_label_map(_write(tmp_path, "map.pbtxt", text))


def test_read_exclusions(tmp_path):
    assert ava.read_exclusions(_write(tmp_path, "ex.csv", "vidA,0902\nvidB,1798\n")) == {("vidA", 902),
                                                                                        ("vidB", 1798)}
    with pytest.raises(ValueError, match=r"ex\.csv:2: "):
        ava.read_exclusions(_write(tmp_path, "ex.csv", "vidA,0902\nvidB,1798,3\n"))


# ---------------------------------------------------------------------------------------------
# Frame and clip indices
# ---------------------------------------------------------------------------------------------

def _official_sequence(second, num_frames, rate, video_frames):
    """PySlowFast's formula written out: centre (sec - 900) * 30, window of num_frames * rate."""
    centre, half = (second - 900) * 30, num_frames * rate // 2
    return [min(max(i, 0), video_frames - 1) for i in range(centre - half, centre + half, rate)]


def test_keyframe_index():
    assert ava.keyframe_index(902) == 60 and ava.keyframe_index(1798) == 26940
    assert ava.keyframe_index(902, start_second=0) == 27060


def test_clip_indices_hand_values():
    np.testing.assert_array_equal(ava.clip_indices(902, 4, 2, 27030), [56, 58, 60, 62])
    np.testing.assert_array_equal(ava.clip_indices(900, 4, 2, 27030), [0, 0, 0, 2])        # start clamped
    np.testing.assert_array_equal(ava.clip_indices(902, 4, 2, 61), [56, 58, 60, 60])       # end clamped


@pytest.mark.parametrize("second, num_frames, rate, video_frames", [
    (902, 32, 2, 27030), (902, 16, 4, 27030), (1798, 8, 8, 26950), (1798, 16, 4, 26941),
    (903, 3, 3, 27030), (1000, 5, 2, 27030), (901, 64, 2, 27030)])
def test_clip_indices_match_official_formula(second, num_frames, rate, video_frames):
    got = ava.clip_indices(second, num_frames, rate, video_frames)
    assert got.shape == (num_frames,)
    np.testing.assert_array_equal(got, _official_sequence(second, num_frames, rate, video_frames))


def test_clip_indices_refuse_a_short_window():
    assert len(_official_sequence(1000, 3, 1, 27030)) == 2          # the official window is short here
    with pytest.raises(ValueError, match="gives 2 frames"):
        ava.clip_indices(1000, 3, 1, 27030)


# ---------------------------------------------------------------------------------------------
# RoIAlign
# ---------------------------------------------------------------------------------------------

def _boxes(height, width, scale):
    """Boxes in input pixels: inside, whole map, crossing each border, far outside, tiny, empty,
    inverted, and random ones."""
    h, w = height / scale, width / scale
    fixed = [[0, 0.3 * w, 0.2 * h, 0.7 * w, 0.9 * h], [1, 0, 0, w, h], [0, -0.3 * w, -0.2 * h, 0.4 * w, 0.5 * h],
             [1, 0.6 * w, 0.5 * h, 1.3 * w, 1.4 * h], [0, -2 * w, 0.1 * h, -1.5 * w, 0.6 * h],
             [1, 0.41 * w, 0.37 * h, 0.41 * w + 0.1 / scale, 0.37 * h + 0.05 / scale],
             [0, 0.5 * w, 0.5 * h, 0.5 * w, 0.8 * h], [1, 0.8 * w, 0.6 * h, 0.2 * w, 0.3 * h],
             [0, 0.97 * w, 0.97 * h, 1.0 * w, 1.0 * h]]
    rng = np.random.default_rng(height * 100 + width)
    corners = rng.uniform(-0.1, 1.1, (6, 2, 2)) * [w, h]
    rand = np.concatenate([rng.integers(0, 2, (6, 1)), corners.min(1), corners.max(1)], axis=1)
    return np.concatenate([np.asarray(fixed), rand]).astype(np.float32)


@pytest.mark.parametrize("shape, out, scale, sampling_ratio, aligned", [
    ((2, 7, 9, 3), (2, 3), 1.0, 0, True),
    ((2, 14, 14, 4), (7, 7), 1 / 16, 0, True),
    ((2, 5, 6, 2), (3, 2), 0.5, 2, True),
    ((2, 6, 4, 2), (2, 2), 1.0, 0, False),
    ((2, 8, 5, 3), (4, 3), 0.25, 3, False),
    ((2, 1, 3, 2), (2, 2), 1.0, 0, True),
])
def test_roi_align_matches_loop_reference(shape, out, scale, sampling_ratio, aligned):
    features = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    rois = _boxes(shape[1], shape[2], scale)
    fn = jax.jit(functools.partial(roi_align, output_size=out, spatial_scale=scale,
                                   sampling_ratio=sampling_ratio, aligned=aligned))
    got = np.asarray(fn(jnp.asarray(features), jnp.asarray(rois)))
    want = ref_roi_align(features, rois, *out, scale, sampling_ratio, aligned)
    assert got.shape == (len(rois), *out, shape[3]) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    assert np.abs(want).max() > 0.5                                  # the reference is not all zeros


def test_roi_align_border_rules_by_hand():
    """One sample per box (legacy boxes, unit scale): exactly at y = H reads row H - 1, exactly
    at y = -1 reads row 0, just past H reads 0; x = 1.5 averages columns 1 and 2."""
    f = np.arange(2 * 4 * 4 * 1, dtype=np.float32).reshape(2, 4, 4, 1)
    rois = np.array([[1, 1, 3, 2, 5], [0, 1, -2, 2, 0], [0, 1, 3.5, 2, 5]], np.float32)
    fn = jax.jit(functools.partial(roi_align, output_size=(1, 1), spatial_scale=1.0, sampling_ratio=1,
                                   aligned=False))
    got = np.asarray(fn(jnp.asarray(f), jnp.asarray(rois)))[:, 0, 0, 0]
    want = [(f[1, 3, 1, 0] + f[1, 3, 2, 0]) / 2, (f[0, 0, 1, 0] + f[0, 0, 2, 0]) / 2, 0.0]
    np.testing.assert_allclose(got, want)


def test_roi_align_grid_cap_is_what_limits_huge_boxes():
    """A box beyond the map wants more adaptive samples than the default slots; with enough slots
    the result is exact again."""
    features = np.random.default_rng(1).normal(size=(1, 4, 4, 2)).astype(np.float32)
    rois = np.array([[0, -19.7, -19.6, 30.2, 30.3]], np.float32)   # 25 samples a bin, none on a border
    want = ref_roi_align(features, rois, 2, 2, 1.0, 0, True)
    fn = jax.jit(roi_align, static_argnames=("output_size", "spatial_scale", "max_grid"))
    capped = np.asarray(fn(jnp.asarray(features), jnp.asarray(rois), (2, 2), spatial_scale=1.0))
    exact = np.asarray(fn(jnp.asarray(features), jnp.asarray(rois), (2, 2), spatial_scale=1.0, max_grid=25))
    np.testing.assert_allclose(exact, want, atol=1e-5)
    assert not np.allclose(capped, want, atol=1e-3)


def test_roi_align_gradient_is_finite_and_reaches_the_features():
    features = jnp.asarray(np.random.default_rng(2).normal(size=(2, 6, 6, 3)), jnp.float32)
    rois = jnp.asarray(_boxes(6, 6, 1.0))
    grad = jax.jit(jax.grad(lambda f: roi_align(f, rois, (3, 3), spatial_scale=1.0).sum()))(features)
    assert np.all(np.isfinite(grad)) and np.abs(grad).sum() > 0


# ---------------------------------------------------------------------------------------------
# Frame-mAP
# ---------------------------------------------------------------------------------------------

A, B = [0.0, 0.0, 0.4, 0.4], [0.5, 0.5, 1.0, 1.0]       # two disjoint boxes
IDS = (1, 2, 3)


def _gt(*rows):
    """rows: (key, box, label)."""
    return ava_map.per_frame([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])


def _det(*rows):
    """rows: (key, box, label, score)."""
    return ava_map.per_frame([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                             [r[3] for r in rows])


def test_perfect_detector_scores_one():
    gt = _gt(("v,902", A, 1), ("v,902", B, 2), ("v,903", A, 1), ("w,902", B, 3))
    det = _det(("v,902", A, 1, 0.9), ("v,902", B, 2, 0.8), ("v,903", A, 1, 0.3), ("w,902", B, 3, 0.7))
    result = ava_map.frame_map(gt, det, IDS)
    assert result["mAP"] == 1.0 and result["ap"] == {1: 1.0, 2: 1.0, 3: 1.0}
    assert result["num_gt"] == {1: 2, 2: 1, 3: 1}


def test_false_positive_ranked_first_halves_ap():
    gt = _gt(("v,902", A, 1))
    det = _det(("v,902", B, 1, 0.9), ("v,902", A, 1, 0.8))
    assert ava_map.frame_map(gt, det, IDS)["ap"][1] == 0.5


def test_duplicate_detection_is_a_false_positive():
    """Ranks: TP (A), FP (A again), TP (B): precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1;
    monotone: 1 then 2/3; AP = 1/2 * 1 + 1/2 * 2/3."""
    gt = _gt(("v,902", A, 1), ("v,902", B, 1))
    det = _det(("v,902", A, 1, 0.9), ("v,902", A, 1, 0.8), ("v,902", B, 1, 0.7))
    assert ava_map.frame_map(gt, det, IDS)["ap"][1] == pytest.approx(5 / 6, abs=1e-12)


def test_a_class_without_positives_is_left_out_and_one_without_detections_counts_zero():
    gt = _gt(("v,902", A, 1), ("v,902", B, 3))
    det = _det(("v,902", A, 1, 0.9), ("v,902", B, 2, 0.8))          # class 2 has no ground truth
    result = ava_map.frame_map(gt, det, IDS)
    assert result["ap"][1] == 1.0 and math.isnan(result["ap"][2]) and result["ap"][3] == 0.0
    assert result["mAP"] == 0.5


def test_classes_outside_the_label_map_are_ignored():
    gt = _gt(("v,902", A, 1), ("v,902", B, 7))
    det = _det(("v,902", B, 7, 0.95), ("v,902", A, 1, 0.9))
    result = ava_map.frame_map(gt, det, IDS)
    assert set(result["ap"]) == set(IDS) and result["mAP"] == 1.0


def test_excluded_timestamps_leave_both_sides():
    gt = _gt(("v,902", A, 1), ("v,903", A, 1))
    det = _det(("v,902", A, 1, 0.5), ("v,903", B, 1, 0.9), ("v,904", B, 1, 0.95))
    assert ava_map.frame_map(gt, det, IDS)["ap"][1] == pytest.approx(1 / 6)  # FP, FP, TP of 2
    result = ava_map.frame_map(gt, det, IDS, excluded={"v,903", "v,904"})
    assert result["ap"][1] == 1.0 and result["num_gt"][1] == 1


@pytest.mark.parametrize("y2, expected", [(0.5, 1.0), (0.49, 0.0), (0.51, 1.0), (0.4999999, 0.0)])
def test_iou_threshold_is_inclusive(y2, expected):
    gt = _gt(("v,902", [0.0, 0.0, 1.0, 1.0], 1))
    det = _det(("v,902", [0.0, 0.0, 1.0, y2], 1, 0.9))
    assert ava_map.frame_map(gt, det, IDS)["ap"][1] == expected


def test_a_detection_does_not_fall_back_to_its_second_best_box():
    """The second detection overlaps G1 most (taken) and G2 at IoU 0.6: a false positive."""
    g1, g2 = [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.6]
    gt = _gt(("v,902", g1, 1), ("v,902", g2, 1))
    det = _det(("v,902", g1, 1, 0.9), ("v,902", [0.0, 0.0, 1.0, 0.95], 1, 0.8))
    assert ava_map.iou(np.array([[0.0, 0.0, 1.0, 0.95]]), np.array([g1, g2]))[0].tolist() == \
        pytest.approx([0.95, 0.6 / 0.95])
    assert ava_map.frame_map(gt, det, IDS)["ap"][1] == 0.5


def test_protocols_differ_in_order_and_capacity():
    # Both detections best-match the one box; given order takes the weaker one first.
    gt = _gt(("v,902", A, 1))
    det = _det(("v,902", A, 1, 0.2), ("v,902", A, 1, 0.9))
    assert ava_map.frame_map(gt, det, IDS)["ap"][1] == 0.5
    assert ava_map.frame_map(gt, det, IDS, protocol="activitynet")["ap"][1] == 1.0
    # 50 stronger false positives push the true one out of the ActivityNet frame.
    crowd = [("v,902", B, 2, 0.5 + i / 1000) for i in range(50)]
    det = _det(*crowd, ("v,902", A, 1, 0.1))
    assert ava_map.frame_map(gt, det, IDS)["ap"][1] == 1.0
    assert ava_map.frame_map(gt, det, IDS, protocol="activitynet")["ap"][1] == 0.0
    with pytest.raises(ValueError, match="protocol"):
        ava_map.frame_map(gt, det, IDS, protocol="voc")


def test_detections_from_scores_and_files_end_to_end(tmp_path):
    """A model's per-box scores become one detection per evaluated class; ground truth read by
    the AVA reader; invalid (empty) boxes dropped."""
    gt_rows = ava.read_annotations(_write(tmp_path, "gt.csv", "v,0902,0.0,0.0,0.4,0.4,1,0\n"
                                                              "v,0902,0.5,0.5,1.0,1.0,3,1\n"))
    gt = ava_map.per_frame(zip(gt_rows.video, gt_rows.second), gt_rows.boxes, gt_rows.action)
    scores = np.zeros((3, 80))
    scores[0, [0, 1, 2]] = [0.9, 0.1, 0.2]         # box A: class 1 high
    scores[1, [0, 1, 2]] = [0.3, 0.1, 0.8]         # box B: class 3 high
    scores[2, :] = 1.0                             # an empty box scoring everything
    boxes = np.array([A, B, [0.2, 0.2, 0.2, 0.6]])
    det = ava_map.detections_from_scores([("v", 902)] * 3, boxes, scores, IDS)
    got_boxes, labels, got_scores = det[("v", 902)]
    assert labels.tolist() == [1, 2, 3] * 3 and got_scores[:6].tolist() == [0.9, 0.1, 0.2, 0.3, 0.1, 0.8]
    np.testing.assert_array_equal(got_boxes[3], B)
    ap = ava_map.frame_map(gt, det, IDS)["ap"]
    assert ap[1] == 1.0 and ap[3] == 1.0 and math.isnan(ap[2])


def test_average_precision_edge_cases():
    assert math.isnan(ava_map.average_precision([0.9], [False], 0))
    assert ava_map.average_precision([], [], 3) == 0.0
    assert ava_map.average_precision([0.9, 0.8], [True, True], 4) == 0.5     # recall stops at 1/2


def _slow_map(gt, det, ids, excluded, threshold, protocol):
    """The official algorithm transcribed one detection at a time (per class, frame, detection)."""
    def overlap(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    aps = {}
    for c in ids:
        num_gt = sum(int(np.sum(labels == c)) for key, (_, labels) in gt.items() if key not in excluded)
        ranked = []
        for key, (boxes, labels, scores) in det.items():
            if key in excluded:
                continue
            order = [i for i in range(len(labels)) if labels[i] in ids]
            if protocol == "activitynet":
                order = sorted(order, key=lambda i: -scores[i])[:50]
            order = [i for i in order if boxes[i][0] < boxes[i][2] and boxes[i][1] < boxes[i][3]]
            truth = [b for b, l in zip(*gt[key]) if l == c] if key in gt else []
            taken = [False] * len(truth)
            for i in order:
                if labels[i] != c:
                    continue
                hit = False
                if truth:
                    ious = [overlap(boxes[i], t) for t in truth]
                    j = ious.index(max(ious))
                    if ious[j] >= threshold and not taken[j]:
                        taken[j] = hit = True
                ranked.append((scores[i], hit))
        if num_gt == 0:
            continue
        ranked.sort(key=lambda r: -r[0])
        precision = [sum(h for _, h in ranked[:k + 1]) / (k + 1) for k in range(len(ranked))]
        aps[c] = sum(max(precision[k:]) for k in range(len(ranked)) if ranked[k][1]) / num_gt
    return aps


@pytest.mark.parametrize("protocol", ava_map.PROTOCOLS)
def test_frame_map_matches_slow_transcription_on_random_data(protocol):
    rng = np.random.default_rng(3)
    gt_rows, det_rows = [], []
    for f in range(40):
        key = ("v", 902 + f)
        people = rng.uniform(0, 0.6, (rng.integers(0, 4), 2))
        for p in people:
            box = [p[0], p[1], p[0] + 0.3, p[1] + 0.35]
            for label in rng.choice([1, 2, 3, 5], rng.integers(1, 3), replace=False):
                gt_rows.append((key, box, label))
            for _ in range(rng.integers(0, 3)):        # jittered detections of this person
                jit = np.asarray(box) + rng.normal(0, 0.05, 4)
                for label in (1, 2, 3, 5):
                    det_rows.append((key, jit, label, rng.uniform()))
        for _ in range(rng.integers(0, 3)):            # background and invalid boxes
            x, y = rng.uniform(0, 0.8, 2)
            det_rows.append((key, [x, y, x + rng.uniform(-0.1, 0.2), y + 0.2], rng.integers(1, 4), rng.uniform()))
    for i in range(60):                                # a crowded frame, over the ActivityNet cap
        det_rows.append((("v", 902), rng.uniform(0, 0.5, 2).tolist() + [0.9, 0.9], 1 + i % 3, rng.uniform()))
    gt, det = _gt(*gt_rows), _det(*det_rows)
    excluded = {("v", 905), ("v", 910)}
    result = ava_map.frame_map(gt, det, IDS, excluded, protocol=protocol)
    want = _slow_map(gt, det, IDS, excluded, 0.5, protocol)
    assert set(want) == {c for c, v in result["ap"].items() if not math.isnan(v)} == set(IDS)
    for c in IDS:
        assert result["ap"][c] == pytest.approx(want[c], abs=1e-12)
    assert 0.05 < result["mAP"] < 0.95 and result["mAP"] == pytest.approx(np.mean(list(want.values())))
