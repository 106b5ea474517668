"""Benchmark suite settings.

`pytest benchmarks/ --benchmark` runs at real sizes (LLaVA-1.5 and LLaVA-NeXT shapes, several
batch sizes) on CUDA when present, else on the CPU, with pytest-benchmark timing. Plain
`pytest benchmarks/` runs the same files as quick smoke tests at small sizes (what `make test`
does): each case runs once and its result is checked against the reference.
"""
import pytest
import torch

from bench_util import environment, peak_memory


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


@pytest.fixture
def record(benchmark):
    """Adds environment and peak memory to the pytest-benchmark record."""
    def _record(fn, device, **info):
        benchmark.extra_info.update(environment())
        benchmark.extra_info.update(info)
        benchmark.extra_info["peak_bytes"] = peak_memory(fn, device)
    return _record


def pytest_generate_tests(metafunc):
    """`batch`: B = 1, 8, 64 on CUDA and 1, 4 on the CPU at real sizes; 2 in smoke mode."""
    if "batch" in metafunc.fixturenames:
        cfg = metafunc.config
        real = cfg.getoption("--benchmark")
        dev = cfg.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        sizes = ([1, 8, 64] if dev == "cuda" else [1, 4]) if real else [2]
        metafunc.parametrize("batch", sizes, ids=[f"B{b}" for b in sizes])
