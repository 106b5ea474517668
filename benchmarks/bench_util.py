"""Helpers shared by the benchmark files (kept out of conftest.py so they import by name), and the
compact summary format of benchmarks/results/ (one file per run; tools/bench_table.py reads it)."""
import datetime
import json
import os
import platform
import subprocess

import torch

SUMMARY_FORMAT = "vtk-bench-summary/1"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn runs: CUDA allocator stats, or on the CPU the larger of two estimates."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # Two views, each blind to something: the profiler sees every tensor left alive between ops
    # but not an op's internal temporaries; the resident-set high-water mark sees those too, but
    # not memory the allocator reuses. The larger of the two is reported.
    return max(_cpu_peak_profiler(fn), _cpu_peak_rss(fn))


def _cpu_peak_profiler(fn) -> int:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Top-level records in the order they ran: an op's memory figure already includes its
    # children's, and "[memory]" records are frees/allocations outside any op.
    running, peak = 0, 0
    for e in prof.events():
        if e.cpu_parent is None and e.cpu_memory_usage != 0:
            running += e.cpu_memory_usage
            peak = max(peak, running)
    return peak


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(field)


def _cpu_peak_rss(fn) -> int:
    """Peak resident memory added while fn runs (Linux): resets the high-water mark (VmHWM) with
    /proc/self/clear_refs, runs fn, reads it back. Counts every page touched, also the
    temporaries a C++ kernel allocates and frees inside one op; large blocks go back to the OS on
    free (mmap), so earlier runs do not hide them. Returns -1 where /proc is unavailable."""
    import gc
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        return -1
    fn()
    return max(0, _status_kb("VmHWM") - base) * 1024


def environment(device=None) -> dict:
    """The machine and versions a run measured (device: the one the benchmarks ran on)."""
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads()}
    on_gpu = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if on_gpu:
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                   gpu_memory_gib=round(props.total_memory / 2**30, 1))
    env["device"] = env["gpu"] if on_gpu else f"CPU ({platform.machine()}, {env['threads']} threads)"
    for name in ("triton", "transformers"):
        try:
            env[name] = __import__(name).__version__
        except Exception:
            pass
    return env


def percentile(sorted_data, q: float) -> float:
    """numpy.percentile's default (linear) on sorted data."""
    h = (len(sorted_data) - 1) * q
    lo = int(h)
    hi = min(lo + 1, len(sorted_data) - 1)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (h - lo)


def case_summary(name: str, times, info: dict) -> dict:
    """One case of a summary: its name, the per-round times as median / p20 / p80 (seconds), the
    round count, and what the benchmark recorded about it (op, impl, B, peak_bytes, ...)."""
    data = sorted(times)
    case = {"case": name, "median_s": percentile(data, 0.5), "p20_s": percentile(data, 0.2),
            "p80_s": percentile(data, 0.8), "rounds": len(data)}
    case.update({k: v for k, v in info.items() if k not in case})
    return case


def git_commit(root: str) -> str:
    """HEAD of the checkout at root, with '+dirty' when the tree has changes; '?' without git.
    VTK_COMMIT overrides it (a copy of a work tree without its .git, as on a lent GPU machine)."""
    if os.environ.get("VTK_COMMIT"):
        return os.environ["VTK_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return (head or "?") + ("+dirty" if dirty and head else "")


def write_summary(path: str, cases: list, env: dict, commit: str, command: str, created: str = None) -> None:
    """benchmarks/results/ format: one JSON object per run."""
    summary = {
        "format": SUMMARY_FORMAT,
        "created": created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "command": command,
        "environment": env,
        "cases": sorted(cases, key=lambda c: c["case"]),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
