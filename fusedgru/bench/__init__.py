"""fusedgru bench: every available backend against torch.nn.GRU on the grids of
docs/SPEC.md section 6.

    fusedgru bench                          the CPU grid without a GPU, "stream" with one
    fusedgru bench --quick                  about a minute: a subset of the grid
    fusedgru bench --grid batch,deep --dtype bfloat16 --mode train --out DIR
    fusedgru bench --compare OLD.json       the change against a saved run
    fusedgru bench --from results.json      reprint / replot a saved run, timing nothing

Per cell (one shape, dtype and mode) every provider is checked against float64, then timed,
on the same weights and inputs.  One file per concern:

    grids.py      the cells: Case, the named grids and their --quick subsets
    providers.py  what is timed: nn.GRU, each fusedgru backend, ref+compile, flashrnn
    cells.py      one cell: inputs, the float64 check, the timed call; run_cell
    timing.py     timing (do_bench / torch.utils.benchmark) and memory of one call
    env.py        the machine, versions and commit recorded with a run
    results.py    results.json's rows: fields, keys, speed-up vs nn.GRU, writing
    report.py     the printed tables and speedup.png
    compare.py    one run against another (--compare)
    command.py    the command line (`fusedgru bench`, `python -m fusedgru.bench`)

results.json holds one row per (cell, provider) with the machine, versions, commit and
TF32 setting; speedup.png plots speed-up vs batch size, one line per hidden size and
backend.
"""

# What other code uses (tests/test_bench.py, benchmarks/), importable from the package as
# before it was split; the underscored ones are benchmarks/'s pytest-benchmark suite.
from .cells import (CellData, RunOptions, _callable, _cast_gru, check_provider,
                    make_cell_data, run_cell)
from .command import _csv, _set_tf32, build_parser, main
from .compare import format_comparison
from .env import environment
from .grids import ALL, DTYPES, GRIDS, MODES, Case, grid_cases
from .providers import BASELINE, Provider, discover_providers
from .report import format_memory_table, format_table, write_plot
from .results import _KEY, SCHEMA, _blank_row, _case_fields, _relative_to_baseline, load_results
from .timing import TimingOptions, peak_memory, saved_activation_bytes, time_call, time_rounds

__all__ = ["main", "Case", "GRIDS", "grid_cases", "Provider", "discover_providers",
           "check_provider", "run_cell", "environment", "SCHEMA"]
