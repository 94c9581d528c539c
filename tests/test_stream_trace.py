"""The stream-trace benchmark's reading of a profiler trace (a synthetic trace; CPU)."""

import pytest

from benchmarks.stream_trace import summarize_trace


def _kernel(ts, dur, name="k", stream=7):
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur,
            "args": {"stream": stream}}


def test_gaps_copies_and_kernels_beside_copies_are_read_per_stream():
    # compute stream 7: three kernels alone (10 µs), a 90 µs gap, three beside a copy (20 µs)
    events = [_kernel(0, 10), _kernel(15, 10), _kernel(30, 10),
              _kernel(130, 20), _kernel(155, 20), _kernel(180, 20),
              _kernel(300, 5, name="other", stream=9)]  # a short kernel elsewhere
    events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 120, "dur": 100,
                   "args": {"stream": 20, "bytes": 50_000_000, "memory bandwidth (GB/s)": 50.0}})
    events += [{"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamWaitEvent", "ts": 1, "dur": 1}
               for _ in range(4)]
    events.append({"ph": "i", "name": "marker", "ts": 0})  # not a duration event: ignored
    s = summarize_trace({"traceEvents": events}, steps=2)
    assert s["compute_stream"] == 7
    assert s["compute_busy_ms"] == pytest.approx(90 / 1e3 / 2)
    assert s["gaps"] == 0.5 and s["gap_ms"] == pytest.approx(90 / 1e3 / 2, abs=1e-3)
    assert s["largest_gaps"][0][0] == pytest.approx(0.09)
    side = s["side_streams"]
    assert list(side) == ["20"] and side["20"]["copies"] == 0.5
    assert side["20"]["GB"] == pytest.approx(0.025) and side["20"]["GBps_min_median_max"][1] == 50
    # the three kernels beside the copy took 10 µs more each than alone: 30 µs over 2 steps
    assert s["beside_copy_excess_ms"] == pytest.approx(0.015, abs=1e-3)
    assert s["stream_waits"] == 2
    assert s["beside_copy_slowest"][0][1] == "k"
    # compute-stream time by kernel name, the most first: three 20 µs and three 10 µs "k"s
    assert s["busy_by_kernel"] == [(pytest.approx(0.045), 3.0, "k")]


def test_a_gap_is_host_late_when_the_next_kernel_was_launched_after_the_gpu_went_idle():
    def launched(k, corr, at):  # kernel k, launched by a runtime call ending at ``at``
        k["args"]["correlation"] = corr
        return [k, {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": at - 5,
                    "dur": 5, "args": {"correlation": corr}}]

    events = (launched(_kernel(0, 10), 1, 0)
              + launched(_kernel(60, 10), 2, 60)      # launched at 60: the GPU idled from 10
              + launched(_kernel(200, 10), 3, 65)     # queued at 65, held back until 200
              + launched(_kernel(215, 10), 4, 90)     # 5 µs after the last: no gap
              + launched(_kernel(300, 10), 5, 260))   # idle 75 µs: 35 the host's, 40 waiting
    s = summarize_trace({"traceEvents": events}, steps=1)
    assert s["gaps"] == 3 and s["gap_ms"] == pytest.approx((50 + 130 + 75) / 1e3)
    assert s["gaps_host_late"] == 1 and s["gap_ms_host_late"] == pytest.approx((50 + 35) / 1e3, abs=1e-3)
    # the host's launch calls: five of 5 µs, and the longest host event among them
    assert s["host_api_ms"] == [(pytest.approx(0.025), "cudaLaunchKernel")]
    assert s["longest_host_events"][0] == (0.005, "cudaLaunchKernel")


def test_kernels_beside_copies_are_compared_with_launches_of_the_same_grid():
    # "k" on a large grid (20 µs) runs only beside the copy, on a small grid (10 µs) only alone:
    # the same kernel on other work, not a slowdown
    def k(ts, dur, grid):
        e = _kernel(ts, dur)
        e["args"].update(grid=grid, block=[128, 1, 1])
        return e

    events = [k(0, 10, [4, 1, 1]), k(15, 10, [4, 1, 1]), k(30, 10, [4, 1, 1]),
              k(130, 20, [64, 1, 1]), k(155, 20, [64, 1, 1]), k(180, 20, [64, 1, 1]),
              k(205, 12, [4, 1, 1]), k(220, 12, [4, 1, 1]), k(235, 12, [4, 1, 1])]
    events.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 120, "dur": 200,
                   "args": {"stream": 20, "bytes": 1, "memory bandwidth (GB/s)": 1.0}})
    s = summarize_trace({"traceEvents": events}, steps=1)
    # only the small-grid launches are compared: 2 µs slower each beside the copy
    assert s["beside_copy_excess_ms"] == pytest.approx(0.006, abs=1e-4)
    assert s["beside_copy_slowest"] == [(pytest.approx(0.006, abs=1e-4), "k grid=[4, 1, 1]")]


def test_a_trace_without_gpu_events_is_an_error():
    with pytest.raises(ValueError, match="no GPU events"):
        summarize_trace({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0,
                                          "dur": 1}]}, steps=1)
