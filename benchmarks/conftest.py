"""Benchmark suite settings.

`pytest benchmarks/ --benchmark` runs at real sizes (LLaVA-1.5 and LLaVA-NeXT shapes, several
batch sizes) on CUDA when present, else on the CPU, with pytest-benchmark timing. Plain
`pytest benchmarks/` runs the same files as quick smoke tests at small sizes (what `make test`
does): each case runs once and its result is checked against the reference.

`--vtk-summary FILE` writes the run's compact summary (benchmarks/results/ format, bench_util):
per case median, p20, p80 and peak memory, with the device, versions and commit.
"""
import os
import shlex
import sys

import pytest
import torch

from bench_util import case_summary, environment, git_commit, peak_memory, write_summary

_CASES = []  # case summaries of this session, for --vtk-summary


def pytest_addoption(parser):
    parser.addoption("--benchmark", action="store_true", default=False,
                     help="run at real sizes with timing (default: small smoke tests)")
    parser.addoption("--bench-device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.addoption("--vtk-summary", default=None, metavar="FILE",
                     help="write a compact summary of the timed cases (median, p20, p80, peak memory; "
                          "device, versions, commit) to FILE")


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
def record(benchmark, request):
    """Adds what a case is (op, impl, sizes, ...) and its peak memory to the pytest-benchmark record;
    after the case, its timings go into the session's summary."""
    info = {}

    def _record(fn, device, **kw):
        info.update(kw)
        info["peak_bytes"] = peak_memory(fn, device)
        benchmark.extra_info.update(info)

    yield _record
    meta = benchmark.stats  # None when timing is off (smoke mode) or the case failed before timing
    if meta is not None and meta.stats.data:
        _CASES.append(case_summary(request.node.name, meta.stats.data, info))
        # Rewritten after every case, so that a run stopped by a time limit keeps what it measured.
        _write_summary(request.config)


_RUN = {}  # environment and commit, looked up once per session


def _write_summary(config):
    path = config.getoption("--vtk-summary")
    if not path:
        return
    if not _RUN:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        _RUN.update(env=environment(dev), commit=git_commit(root),
                    command="pytest " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    write_summary(path, _CASES, _RUN["env"], _RUN["commit"], _RUN["command"])


def pytest_sessionfinish(session, exitstatus):
    _write_summary(session.config)  # also when no case was timed: an empty summary says so


def pytest_generate_tests(metafunc):
    """`batch`: B = 1, 8, 64 on CUDA and 1, 4 on the CPU at real sizes; 2 in smoke mode."""
    if "batch" in metafunc.fixturenames:
        cfg = metafunc.config
        real = cfg.getoption("--benchmark")
        dev = cfg.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
        sizes = ([1, 8, 64] if dev == "cuda" else [1, 4]) if real else [2]
        metafunc.parametrize("batch", sizes, ids=[f"B{b}" for b in sizes])
