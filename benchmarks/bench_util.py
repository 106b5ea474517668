"""Helpers shared by the benchmark files (kept out of conftest.py so they import by name)."""
import platform

import torch


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


def environment() -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        pass
    return env
