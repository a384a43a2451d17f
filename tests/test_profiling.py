"""Measuring a step from the outside (profiling.py): where the GPU idles, from a profiler's trace."""

from cogvideox_lora import profiling


def test_profile_attributes_gpu_idle_to_the_phase_that_launched_the_next_work():
    def kernel(ts, dur, correlation, name="k"):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}

    def launch(ts, correlation):
        return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 1,
                "args": {"correlation": correlation}}

    events = [
        {"ph": "X", "cat": "user_annotation", "name": "forward", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "optimizer", "ts": 300, "dur": 50},
        launch(1, 1), kernel(10, 50, 1),
        launch(20, 2), kernel(55, 20, 2),           # overlaps the first: no gap, busy counted once
        launch(30, 3), kernel(175, 25, 3, "late"),  # 100 us idle, launched in forward
        launch(310, 4), kernel(400, 10, 4, "adam"),  # 200 us idle, launched by the optimizer
    ]
    idle = profiling.gpu_idle(events)
    assert idle["forward"]["idle_ms"] == 0.1 and idle["forward"]["gaps"] == 1
    assert idle["optimizer"] == {"idle_ms": 0.2, "gaps": 1, "largest_us": 200, "largest_before": "adam"}
    assert idle["busy_ms"] == (65 + 25 + 10) / 1000 and idle["span_ms"] == 0.4
    assert set(idle) == {"forward", "optimizer", "busy_ms", "span_ms"}
