"""benchmarks/memory_timeline.py: the allocator trace becomes a timeline, a PNG and a GIF."""

import pandas as pd
import pytest

from benchmarks import memory_timeline as mt


def test_timeline_adds_allocations_and_frees_to_what_was_there():
    events = [(1000.0, 300), (1500.0, 200), (2500.0, -300), (4000.0, -200)]
    df = mt.timeline(events, base_B=1000)
    assert df.ms.tolist() == [0.0, 0.5, 1.5, 3.0]
    assert df.allocated_B.tolist() == [1300, 1500, 1200, 1000]
    assert mt.timeline([], 7).allocated_B.tolist() == [7]


def test_png_and_gif_are_drawn_from_both_variants(tmp_path):
    from PIL import Image

    rows = []
    for variant, scale, length in (("without AC", 1.0, 10.0), ("with MuTwoAC", 0.5, 12.0)):
        for k in range(50):
            rows.append({"variant": variant, "ms": length * k / 49,
                         "allocated_B": int(scale * (1 + k * (49 - k)) * 2**24)})
    df = pd.DataFrame(rows)
    mt.plot(df, "test", 3 * 2**30, tmp_path / "t.png")
    mt.animate(df, "test", 3 * 2**30, tmp_path / "t.gif", frames=6)
    assert (tmp_path / "t.png").stat().st_size > 10_000
    with Image.open(tmp_path / "t.gif") as gif:
        assert gif.n_frames == 6


def test_needs_cuda_on_the_command_line():
    with pytest.raises(SystemExit):
        mt.main(["--device", "cpu"])


@pytest.mark.gpu
def test_recorded_on_the_gpu_with_ac_peaks_lower(tmp_path):
    df = mt.main(["--model", "cnn", "--batch-size", "64", "--share", "0.0", "--frames", "4",
                  "--out", str(tmp_path)])
    peaks = df.groupby("variant").allocated_B.max()
    assert peaks["with MuTwoAC"] < peaks["without AC"]
    assert (df.groupby("variant").allocated_B.first() > 0).all()  # parameters, batch, Adam state
    assert (tmp_path / "cnn_memory_timeline.gif").exists()
