"""Measuring a training step from the outside: what it keeps for its backward pass, and where the GPU idles.

The benchmarks (benchmarks/profile_step.py) report these; the tests check them on the CPU.
"""

import torch


def saved_bytes(transformer, run):
    """What run() keeps for the backward pass beside the transformer's own parameters, in bytes, and its result."""
    own = {p.data_ptr() for p in transformer.parameters()}
    sizes = []

    def pack(tensor):
        if tensor.data_ptr() not in own:
            sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return sum(sizes), result


PHASES = ("batch", "forward", "backward", "clip", "optimizer")
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCHES = ("cuda_runtime", "cuda_driver")


def gpu_idle(events: list[dict], gap_us: float = 1.0) -> dict:
    """GPU idle time in profiled steps (a chrome trace's events), by the step's phase in which the host
    launched the work that ended each gap: {phase: {"idle_ms", "gaps", "largest_us", "largest_before"}},
    plus "busy_ms" and "span_ms" (first to last GPU work). A gap is counted from gap_us on.
    """
    work = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_WORK), key=lambda e: e["ts"])
    launched_at = {e["args"]["correlation"]: e["ts"] for e in events
                   if e.get("cat") in LAUNCHES and "correlation" in e.get("args", {})}
    phases = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                    if e.get("cat") == "user_annotation" and e.get("name") in PHASES)

    def phase_at(ts):
        return next((name for start, end, name in phases if start <= ts <= end), "between")

    result = {p: {"idle_ms": 0.0, "gaps": 0, "largest_us": 0.0, "largest_before": ""} for p in (*PHASES, "between")}
    busy, end = 0.0, None
    for e in work:
        start, stop = e["ts"], e["ts"] + e["dur"]
        if end is not None and start - end >= gap_us:
            launch = launched_at.get(e.get("args", {}).get("correlation"))
            entry = result[phase_at(launch if launch is not None else start)]
            entry["idle_ms"] += (start - end) / 1000
            entry["gaps"] += 1
            if start - end > entry["largest_us"]:
                entry["largest_us"], entry["largest_before"] = start - end, e["name"][:60]
        busy += max(0.0, stop - max(start, end or start))
        end = stop if end is None else max(end, stop)
    result = {p: v for p, v in result.items() if v["gaps"]}
    return {**result, "busy_ms": busy / 1000, "span_ms": (end - work[0]["ts"]) / 1000 if work else 0.0}
