"""Speed of every provider against torch.nn.GRU, one test per (cell, provider).

Each test first checks the provider against the float64 oracle on the cell's own weights
and inputs (SPEC section 5's budget); a wrong provider fails here and is never timed.
Then: on the CPU pytest-benchmark's rounds time the call; on a GPU
triton.testing.do_bench's median is the figure (extra_info["median_ms"]) and
pytest-benchmark's synchronised rounds are kept beside it.  Tests of one cell share a
pytest-benchmark group, so its table lists the providers side by side.
"""

import torch

from fusedgru import bench


def test_gru(bench_cell, benchmark, bench_env, bench_options, is_smoke, bench_rows):
    case, provider = bench_cell
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = provider.unsupported(case, device)
    if why is not None:
        import pytest

        pytest.skip(f"{provider.name} does not run {case.label}: {why}")
    data = bench.make_cell_data(case, device, bench_options.seed)

    report = bench.check_provider(provider, case, data, bench_options.check_steps)
    assert report.ok, (f"{provider.name} is WRONG on {case.label} (not timed): "
                       f"{report.failures}")

    # what `fusedgru bench` times for this cell (fusedgru/bench/cells.py run_cell): the
    # sequence module, a GRUCell loop or a rollout module, called in the provider's layout
    module = provider.module_for(case, bench._cast_gru(data.gru64, bench.DTYPES[case.dtype]))
    fn = bench._callable(module, case, data, provider.layout)
    benchmark.group = case.label
    benchmark.extra_info.update(bench_env)
    benchmark.extra_info.update(bench._case_fields(case), provider=provider.name,
                                check_worst_ratio=report.worst)
    row = bench._blank_row(case, provider, bench_options.tf32)
    row["check"] = {"ok": True, "worst_ratio": report.worst}

    if is_smoke:
        benchmark(fn)  # pytest-benchmark disabled: one call
        bench_rows.append(row)
        return
    if device.type == "cuda":
        ms, timing = bench.time_call(fn, device, bench_options.timing)

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=20, warmup_rounds=3, iterations=1)
    else:
        benchmark(fn)
        ms = benchmark.stats.stats.median * 1e3
        timing = {"method": "pytest-benchmark(median)"}
    row.update(median_ms=ms, us_per_step=ms * 1e3 / case.T, timing=timing,
               peak_mem_bytes=bench.peak_memory(fn, device))
    if case.mode == "train":
        row["saved_bytes"] = bench.saved_activation_bytes(module, case, data, provider.layout)
    benchmark.extra_info.update(median_ms=ms, us_per_step=row["us_per_step"],
                                timing=timing, peak_mem_bytes=row["peak_mem_bytes"],
                                saved_bytes=row["saved_bytes"])
    bench_rows.append(row)
