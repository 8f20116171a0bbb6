"""The Kinetics CSV checking command: categories of real good and damaged mp4s, exit
codes, the clean CSV, malformed lines and the process pool."""
import os
import subprocess
import sys

import numpy as np
import pytest

from maskfeat_jax.data import check_videos, make_video_demo, video_decode, video_source

av = pytest.importorskip("av")


def _encode(path, frames):
    clip = np.random.default_rng(frames).integers(0, 256, (frames, 32, 32, 3), dtype=np.uint8)
    make_video_demo.encode(str(path), clip, *make_video_demo.pick_codec())
    return path.read_bytes()


def _zero_packets(data: bytes, path, first: int) -> bytes:
    """``data`` with the frame bytes of packets ``first..last`` (decode order) set to zero."""
    with av.open(str(path)) as container:
        packets = [(p.pos, p.size) for p in container.demux(container.streams.video[0]) if p.size]
    start, (pos, size) = packets[first][0], packets[-1]
    return data[:start] + bytes(pos + size - start) + data[pos + size:]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of tiny videos, and a CSV of them with its expected categories per line."""
    d = tmp_path_factory.mktemp("videos")
    good = _encode(d / "ok_a.mp4", 8)
    _encode(d / "ok_b.mp4", 8)
    _encode(d / "short.mp4", 3)
    (d / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    (d / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (d / "text.mp4").write_text("not a video\n" * 20)
    (d / "zeroed.mp4").write_bytes(_zero_packets(good, d / "ok_a.mp4", 0))   # no frame decodes
    (d / "tail.mp4").write_bytes(_zero_packets(good, d / "ok_a.mp4", -1))    # the last frame does not
    with av.open(str(d / "audio.mp4"), mode="w") as container:              # no video stream
        stream = container.add_stream("aac", rate=16000)
        for i in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    lines = ["ok_a.mp4 0", "short.mp4,1", "", "missing.mp4 2", "random.mp4 3", "truncated.mp4 4",
             "text.mp4 5", "zeroed.mp4 6", "tail.mp4 7", "audio.mp4 8", f"{d / 'ok_b.mp4'} 9"]
    (d / "all.csv").write_text("\n".join(lines) + "\n")
    # line -> category with --decode=first and no --min_frames. The truncated mp4 is
    # unreadable, not corrupt: PyAV writes the moov atom (the index) after the frames, so
    # the first half has no index and FFmpeg cannot open it.
    expected = {4: "missing", 5: "unreadable", 6: "unreadable", 7: "unreadable", 8: "corrupt", 10: "unreadable"}
    return d, expected


def _run(capsys, *args):
    code = check_videos.main([str(a) for a in args])
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert all(len(row) == 4 for row in rows), out
    return code, {int(row[1]): (row[0], row[2], row[3]) for row in rows}, err


def test_categories_with_first_frame_decoding(videos, capsys):
    d, expected = videos
    code, report, err = _run(capsys, f"--csv={d / 'all.csv'}")
    assert code == 1
    assert {line: row[0] for line, row in report.items()} == expected
    assert report[4][1] == str(d / "missing.mp4")          # the path as opened, joined to the root
    assert report[10][2] == "ValueError: no video stream"
    for name, n in [("ok", 4), ("missing", 1), ("unreadable", 4), ("corrupt", 1), ("too_short", 0)]:
        assert f"  {name:<10} {n:>8}" in err
    assert "10 videos checked" in err
    assert "ok videos: 27 frames" in err                     # header counts: 8 + 3 + 8 + 8


def test_decode_all_finds_late_damage_and_short_videos(videos, capsys):
    d, expected = videos
    code, report, err = _run(capsys, f"--csv={d / 'all.csv'}", "--decode=all", "--min_frames=5")
    assert code == 1
    assert {line: row[0] for line, row in report.items()} == {**expected, 2: "too_short", 9: "corrupt"}
    assert report[2][2].startswith("3 frames < --min_frames=5")
    assert "ok videos: 16 frames" in err
    assert check_videos.check_video(str(d / "ok_a.mp4"), "all") == check_videos.Check("ok", "", 8, 8 / 30)
    # --decode=first takes the header's count for --min_frames
    assert check_videos.check_video(str(d / "short.mp4"), "first", min_frames=4).category == "too_short"
    assert check_videos.check_video(str(d / "short.mp4"), "first", min_frames=3).category == "ok"


def test_loader_agrees_on_good_and_unreadable_videos(videos):
    d, _ = videos
    for name, ok in [("ok_a", True), ("short", True), ("missing", False), ("random", False),
                     ("truncated", False), ("text", False), ("audio", False), ("zeroed", False),
                     ("tail", True)]:     # training recovers the damaged last frame; --decode=all does not
        _, decoded = video_decode.decode_clip(str(d / f"{name}.mp4"), None, num_frames=4, sampling_rate=1,
                                       mode="test", num_clips=1)
        assert decoded is ok, name


def test_out_is_the_good_rows_and_exit_0_on_a_clean_csv(videos, capsys):
    d, _ = videos
    out = d / "clean.csv"
    code, _, err = _run(capsys, f"--csv={d / 'all.csv'}", f"--out={out}")
    assert code == 1 and "wrote 4 ok lines" in err
    assert out.read_text().splitlines() == ["ok_a.mp4 0", "short.mp4,1", "tail.mp4 7", f"{d / 'ok_b.mp4'} 9"]
    every = video_source.parse_csv(d / "all.csv")
    assert video_source.parse_csv(out) == [every[i] for i in (0, 1, 7, 9)]
    assert sorted(p.name for p in d.iterdir() if "clean" in p.name) == ["clean.csv"]   # no temp file left
    code, report, _ = _run(capsys, f"--csv={out}", "--decode=all")    # tail.mp4 is not clean under all
    assert code == 1 and list(report) == [3]
    code, report, err = _run(capsys, f"--csv={out}")
    assert (code, report) == (0, {}) and "  ok                4" in err


def test_malformed_line_names_file_and_line(videos, capsys, tmp_path):
    d, _ = videos
    bad = tmp_path / "bad.csv"
    bad.write_text(f"{d / 'ok_a.mp4'} 0\n\n{d / 'ok_b.mp4'} one\n")
    code = check_videos.main([f"--csv={bad}", f"--out={tmp_path / 'clean.csv'}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert f"error: {bad}:3: label 'one' is not an integer" in err
    assert not (tmp_path / "clean.csv").exists()
    assert check_videos.main([f"--csv={tmp_path / 'none.csv'}"]) == 2


@pytest.mark.parametrize("args", [[], ["--csv=x.csv", "--workers=0"], ["--csv=x.csv", "--decode=some"],
                                  ["--csv=x.csv", "--min_frames=-1"], ["--csv=x.csv", "--out=/no/such/dir/c.csv"]])
def test_usage_errors_exit_2(args, capsys):
    with pytest.raises(SystemExit) as e:
        check_videos.main(args)
    assert e.value.code == 2


def test_workers_give_the_same_report(videos, capsys):
    """The command as run from a shell, with a spawn pool, against one process."""
    d, _ = videos
    args = [f"--csv={d / 'all.csv'}", "--decode=all", "--min_frames=5"]
    code = check_videos.main(args)
    out, err = capsys.readouterr()
    run = subprocess.run([sys.executable, "-m", "maskfeat_jax.data.check_videos", *args, "--workers=2"],
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert (run.returncode, run.stdout, run.stderr) == (code, out, err)
    assert code == 1 and len(out.splitlines()) == 8


def test_a_video_the_training_loader_cannot_read_is_corrupt(videos, monkeypatch):
    d, _ = videos
    assert check_videos.check_video(str(d / "ok_a.mp4")).category == "ok"
    monkeypatch.setattr(video_decode, "decode_clip", lambda *a, **k: (None, False))
    r = check_videos.check_video(str(d / "ok_a.mp4"))
    assert r.category == "corrupt" and "decode_clip" in r.reason


def test_empty_csv_dead_worker_and_unwritable_out_exit_2(videos, capsys, tmp_path, monkeypatch):
    d, _ = videos
    (tmp_path / "empty.csv").write_text("\n\n")
    assert check_videos.main([f"--csv={tmp_path / 'empty.csv'}"]) == 2
    assert "lists no videos" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()                          # os.replace onto a folder fails
    assert check_videos.main([f"--csv={d / 'all.csv'}", f"--out={tmp_path / 'taken'}"]) == 2
    assert f"--out={tmp_path / 'taken'}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.csv", "taken"]   # no temp file left

    def dies(*a, **k):
        raise check_videos.BrokenProcessPool("worker died")
        yield
    monkeypatch.setattr(check_videos, "check_csv", dies)
    assert check_videos.main([f"--csv={d / 'all.csv'}", "--workers=2"]) == 2
    assert "--workers=1" in capsys.readouterr().err
