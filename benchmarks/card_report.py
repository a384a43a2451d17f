"""card_rows.sh's figures: a row's JSON line from its run under the ballast, and the lines that sum the rows up.

    python benchmarks/card_report.py row NAME GIB_FREE EXIT SMI_CSV ROW_JSON BALLAST_LEFT MEMAVAILABLE_LOG >> rows.jsonl
    python benchmarks/card_report.py summary rows.jsonl
"""

import json
import os
import sys


def readings(path: str) -> list[float]:
    return [float(line) for line in open(path) if line.strip().replace(".", "", 1).isdigit()]


def row(name: str, leave: str, status: str, smi: str, result: str, left: str, meminfo: str) -> dict:
    """The row's figures: nvidia-smi's peak over its first reading (the ballast's, before the trainer started), in
    GiB, whether the run finished and fitted, and what bench_train.py wrote of it; the host's, as the machine
    counts it: the most MemAvailable fell below its first reading (pinned buffers included, page cache not)."""
    leave_gib, finished = float(leave), int(status) == 0
    used, available = readings(smi), readings(meminfo)
    peak = (max(used) - used[0]) / 1024 if used else None  # nvidia-smi counts MiB
    host = (available[0] - min(available)) / 2**20 if available else None  # /proc/meminfo counts KiB
    run = json.load(open(result)) if finished and os.path.exists(result) else {"rows": [{}], "environment": None}
    return {"row": name, "card_free_gib": leave_gib, "ballast_left_gib": float(left), "exit": int(status),
            "finished": finished, "device_peak_smi_gib": peak, "host_peak_meminfo_gib": host,
            "fits": finished and peak is not None and peak <= leave_gib,
            **{k: v for k, v in run["rows"][0].items() if k != "row"}, "environment": run["environment"]}


def fmt(value, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def summary(path: str) -> None:
    for line in open(path):
        r = json.loads(line)
        state = "finished" if r["finished"] else f"FAILED (exit {r['exit']})"
        print(f"{r['row']} in {r['card_free_gib']} GiB: {state}, device peak {fmt(r['device_peak_smi_gib'])} GiB by "
              f"nvidia-smi (the trainer's NVML: training {fmt(r.get('peak_device_memory_gib'))}, validation "
              f"{fmt(r.get('peak_device_memory_validation_gib'))}; context and kernels "
              f"{fmt(r.get('device_overhead_gib'))}), estimate {fmt(r.get('estimated_peak_gib'))} (allocated "
              f"{fmt(r.get('estimated_allocator_gib'))}; PyTorch's peak {fmt(r.get('peak_memory_allocated_gib'))}, "
              f"validation {fmt(r.get('peak_memory_validation_gib'))}), plan {r.get('memory_plan')}, step "
              f"{fmt(r.get('median_step_time_s'), '.3f')} s, host {fmt(r.get('host_peak_meminfo_gib'), '.1f')} GiB "
              f"by MemAvailable (the trainer's resident peak {fmt(r.get('peak_host_rss_gib'), '.1f')}, pinned "
              f"{fmt(r.get('host_pinned_gib'), '.1f')}, by part {r.get('peak_host_rss_gib_by_part')}; estimate "
              f"{fmt(r.get('estimated_host_gib'), '.1f')})")


if __name__ == "__main__":
    if sys.argv[1] == "row":
        print(json.dumps(row(*sys.argv[2:9])))
    else:
        summary(sys.argv[2])
