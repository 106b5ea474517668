"""Benchmark suite settings.

`pytest benchmarks/ --benchmark` runs at real sizes (LLaVA-1.5 and LLaVA-NeXT shapes, several
batch sizes) on CUDA when present, else on the CPU, with pytest-benchmark timing. Plain
`pytest benchmarks/` runs the same files as quick smoke tests at small sizes (what `make test`
does): each case runs once and its result is checked against the reference.
"""
import os
import platform

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run at real sizes with timing (default: small smoke tests)")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")


def pytest_configure(config):
    if not config.getoption("--benchmark"):
        # Smoke mode: one round, no calibration, and no result table noise.
        config.option.benchmark_disable = True


@pytest.fixture(scope="session")
def real_sizes(request) -> bool:
    return bool(request.config.getoption("--benchmark"))


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    name = request.config.getoption("--bench-device")
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn runs (CUDA allocator stats, or tracemalloc-free CPU probe)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # CPU: the profiler's memory tracking reports bytes allocated by ATen; peak = max running total.
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running, peak = 0, 0
    events = sorted((e for e in prof.events() if e.cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    for e in events:
        running += e.cpu_memory_usage
        peak = max(peak, running)
    return peak


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


@pytest.fixture
def record(benchmark):
    """Adds environment and peak memory to the pytest-benchmark record."""
    def _record(fn, device, **info):
        benchmark.extra_info.update(environment())
        benchmark.extra_info.update(info)
        benchmark.extra_info["peak_bytes"] = peak_memory(fn, device)
    return _record
