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


def test_a_trace_without_gpu_events_is_an_error():
    with pytest.raises(ValueError, match="no GPU events"):
        summarize_trace({"traceEvents": [{"ph": "X", "cat": "cpu_op", "name": "x", "ts": 0,
                                          "dur": 1}]}, steps=1)
