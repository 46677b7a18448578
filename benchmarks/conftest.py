"""The pytest-benchmark suite: every provider against torch.nn.GRU on SPEC section 6's grids.

    pytest benchmarks/ --benchmark-json=bench.json          the default grid of the device
    pytest benchmarks/ --bench-grid=stream,batch --bench-backends=cuda,triton
    pytest benchmarks/ --benchmark-disable                   CI smoke test: the "tiny" grid,
                                                             each provider checked, run once

The cells, providers, correctness check, timing and memory measurement are those of
`fusedgru bench` (fusedgru/bench/); this file only turns them into pytest parameters.
Without a CUDA device the Triton kernels can only run under Triton's interpreter, which must
be switched on before fusedgru's kernels are imported: that is done here, first (as in
tests/conftest.py).  The interpreter is a correctness tool, so the "triton" provider is not
timed on the CPU unless named in --bench-backends.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

try:  # noqa: E402
    import pytest_benchmark  # noqa: F401

    HAS_PYTEST_BENCHMARK = True
except ImportError:  # the device machine may lack it: the suite still runs, untimed
    HAS_PYTEST_BENCHMARK = False

from fusedgru import bench  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_ROWS = []  # one bench-style row per timed test, for the speed-up table at the end


def pytest_addoption(parser):
    group = parser.getgroup("fusedgru benchmarks")
    group.addoption("--bench-grid", default=None,
                    help="grids to run (comma-separated, or all); default: cpu without a "
                         "GPU, stream with one; tiny with --benchmark-disable")
    group.addoption("--bench-backends", default=None,
                    help="providers besides nn.GRU (fusedgru backend names, ref+compile, "
                         "flashrnn); default: the fast paths available here")
    group.addoption("--bench-quick", action="store_true", help="the --quick subset")
    group.addoption("--bench-check-steps", type=int, default=64,
                    help="steps checked against float64 before timing (default 64)")
    if not HAS_PYTEST_BENCHMARK:
        group.addoption("--benchmark-disable", action="store_true",
                        help="(pytest-benchmark is not installed: every run is untimed)")


def smoke(config) -> bool:
    """True when nothing is timed: --benchmark-disable, or no pytest-benchmark."""
    return (not HAS_PYTEST_BENCHMARK) or bool(config.getoption("benchmark_disable", False))


def _cases(config):
    grid = config.getoption("bench_grid")
    if grid is None:
        grid = "tiny" if smoke(config) else ("stream" if DEVICE.type == "cuda" else "cpu")
    grids = list(bench.ALL) if grid == "all" else bench._csv(grid)
    quick = config.getoption("bench_quick") or smoke(config)
    return [c for g in grids for c in bench.grid_cases(g, quick=quick)]


def _providers(config):
    names = config.getoption("bench_backends")
    requested = None
    if names:
        requested = bench._csv(names)
    # --benchmark-disable: leave out ref+compile (tens of seconds of compiling on 2 cores)
    quick = config.getoption("bench_quick") or smoke(config)
    providers, _ = bench.discover_providers(DEVICE, requested, quick=quick)
    return providers


def pytest_generate_tests(metafunc):
    if "bench_cell" in metafunc.fixturenames:
        params = [(c, p) for c in _cases(metafunc.config) for p in _providers(metafunc.config)]
        metafunc.parametrize("bench_cell", params,
                             ids=[f"{c.label.replace(' ', '-')}-{p.name}" for c, p in params])
    if "memory_cell" in metafunc.fixturenames:
        params = [(c, p) for c in _cases(metafunc.config) if c.mode == "train"
                  for p in _providers(metafunc.config) if p.kind == "fusedgru"]
        metafunc.parametrize("memory_cell", params,
                             ids=[f"{c.label.replace(' ', '-')}-{p.name}" for c, p in params])


@pytest.fixture(scope="session")
def bench_env():
    """Device name, versions, commit and TF32 setting, recorded in every row."""
    if DEVICE.type == "cuda":  # fp32 compares exact fp32 with exact fp32, as `fusedgru bench`
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    env = bench.environment(DEVICE)
    return {k: env[k] for k in ("device_name", "capability", "torch", "cuda", "cudnn",
                                "triton", "commit", "dirty", "tf32", "threads")}


@pytest.fixture
def bench_options(request):
    return bench.RunOptions(check_steps=request.config.getoption("bench_check_steps"),
                            timing=bench.TimingOptions(quick=bool(
                                request.config.getoption("bench_quick"))),
                            tf32=False if DEVICE.type == "cuda" else None)


@pytest.fixture
def is_smoke(request):
    return smoke(request.config)


@pytest.fixture
def bench_rows():
    return _ROWS


if not HAS_PYTEST_BENCHMARK:

    class _Untimed:
        """Stands in for pytest-benchmark's fixture: runs the function once."""

        disabled = True
        group = None

        def __init__(self):
            self.extra_info = {}

        def __call__(self, fn, *args, **kwargs):
            return fn(*args, **kwargs)

        def pedantic(self, target, args=(), kwargs=None, **_):
            return target(*args, **(kwargs or {}))

    @pytest.fixture
    def benchmark():
        return _Untimed()


def pytest_terminal_summary(terminalreporter):
    timed = [r for r in _ROWS if r.get("median_ms") is not None]
    if not timed:
        return
    groups = {}
    for r in timed:
        groups.setdefault(tuple(r[k] for k in bench._KEY), []).append(r)
    for rows in groups.values():
        bench._relative_to_baseline(rows)
    terminalreporter.section("fusedgru: speed-up vs nn.GRU (nn.GRU median / provider median)")
    terminalreporter.write_line(bench.format_table(timed, DEVICE.type))
