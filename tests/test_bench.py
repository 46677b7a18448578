"""`fusedgru bench` (fusedgru/bench/) at tiny sizes: the table, results.json, --compare,
--from, the spread of each timing, and that a wrong provider is reported and never timed."""

import copy
import json
from pathlib import Path

import pytest
import torch

from fusedgru import bench

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = bench.main(["--grid", "tiny", "--quick", "--backends", "reference", "--out", str(out),
                     "--no-progress", "--threads", "1"])
    return rc, out, json.loads((out / "results.json").read_text())


def test_tiny_grid_results(tiny_run, capsys):
    rc, out, res = tiny_run
    assert rc == 0
    meta, rows = res["meta"], res["rows"]
    assert res["schema"] == bench.SCHEMA
    for k in ("device_name", "torch", "cuda", "cudnn", "triton", "commit", "date", "tf32"):
        assert k in meta
    cases = bench.grid_cases("tiny", quick=True)
    assert len(rows) == 2 * len(cases)  # nn.GRU and reference on every cell
    assert {r["provider"] for r in rows} == {"nn.GRU", "reference"}
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_ms"] > 0 and r["us_per_step"] == pytest.approx(
            r["median_ms"] * 1e3 / r["T"])
        assert r["check"]["ok"] and r["check"]["worst_ratio"] <= 1
        assert r["speedup_vs_nn_gru"] > 0
        if r["provider"] == "nn.GRU":
            assert r["speedup_vs_nn_gru"] == pytest.approx(1.0)
        if r["mode"] == "train":
            assert r["saved_bytes"] > 0 and r["mem_vs_nn_gru"] > 0
            assert set(r["check"]["errors"]) >= {"y", "h_n", "dx", "dh0", "d.weight_hh_l0"}
        else:
            assert set(r["check"]["errors"]) == {"y", "h_n"}
    # the reference keeps exactly y + 4H per row per step (SPEC section 4); nn.GRU more
    for r in rows:
        if r["mode"] == "train" and r["provider"] == "reference":
            assert r["saved_bytes"] == r["T"] * r["B"] * 5 * r["H"] * 4


SAVED_RUN = (Path(__file__).resolve().parent.parent / "benchmarks" / "results"
             / "2026-11-23_cpu-amd-epyc-2-cores_ec8da29.json")


def _compare(tmp_path, capsys, new: dict, old: dict) -> str:
    (tmp_path / "new.json").write_text(json.dumps(new))
    (tmp_path / "old.json").write_text(json.dumps(old))
    rc = bench.main(["--from", str(tmp_path / "new.json"), "--compare",
                     str(tmp_path / "old.json"), "--out", str(tmp_path)])
    assert rc == 0
    return capsys.readouterr().out


def _slower_old(res: dict, factor: float) -> dict:
    """A copy of a run where every provider took ``factor`` times as long."""
    old = copy.deepcopy(res)
    for r in old["rows"]:
        r["median_ms"] *= factor
    return old


def test_table_and_compare(tiny_run, tmp_path, capsys):
    _, out, res = tiny_run
    text = _compare(tmp_path, capsys, res, _slower_old(res, 2))  # old took twice as long
    assert "vs nn.GRU" in text and "us/step" in text and "median ms" in text
    assert "training memory vs nn.GRU" in text
    assert "compare:" in text
    changes = [line for line in text.splitlines() if "2.00x faster" in line]
    # every cell, in words, and each provider's summary line
    assert len(changes) == len(res["rows"]) + 2, text
    assert "  nn.GRU      2.00x faster than the old run" in text
    assert "reference   2.00x faster than the old run" in text
    assert "warning: different" not in text and "unknown" not in text  # like for like


def test_compare_says_slower_and_warns_about_other_settings(tiny_run, tmp_path, capsys):
    """A slower new run is called slower; a run on another device or with other thread
    counts is flagged; a file without the thread count is flagged as unknown."""
    _, _, res = tiny_run
    old = _slower_old(res, 0.5)  # old took half as long: the new run is 2x slower
    old["meta"].update(threads=res["meta"]["threads"] + 3, device_name="another machine")
    text = _compare(tmp_path, capsys, res, old)
    assert sum("2.00x slower" in line for line in text.splitlines()) == len(res["rows"]) + 2
    assert "2.00x slower than the old run" in text and "x faster" not in text
    assert "warning: different devices (old another machine" in text
    assert (f"warning: different CPU thread counts (old {res['meta']['threads'] + 3}, new "
            f"{res['meta']['threads']})") in text

    del old["meta"]["threads"]  # written before the thread count was recorded
    text = _compare(tmp_path, capsys, res, old)
    assert ("warning: CPU thread count of the old run unknown (not recorded in its file; the "
            f"new run used {res['meta']['threads']})") in text


def test_spread_recorded_and_printed(tiny_run, capsys):
    """Every timing records its spread (IQR / median), shown as a percentage in the table."""
    _, _, res = tiny_run
    for r in res["rows"]:
        iqr = r["timing"]["iqr_ms"]
        assert iqr >= 0 and r["spread"] == pytest.approx(iqr / r["median_ms"])
    table = bench.format_table(res["rows"], "cpu")
    assert "spread" in table.splitlines()[0]
    for r, line in zip(res["rows"], table.splitlines()[2:]):
        assert f" {100 * r['spread']:.1f}% " in line


def test_noisy_cells_are_named_in_one_warning(tiny_run, tmp_path, capsys):
    _, _, res = tiny_run
    quiet = copy.deepcopy(res)
    for r in quiet["rows"]:
        r["spread"] = 0.01
    noisy = copy.deepcopy(quiet)
    noisy["rows"][1]["spread"] = 0.25
    noisy["rows"][-1]["spread"] = 0.11
    (tmp_path / "quiet.json").write_text(json.dumps(quiet))
    (tmp_path / "noisy.json").write_text(json.dumps(noisy))
    assert bench.main(["--from", str(tmp_path / "quiet.json"), "--out", str(tmp_path)]) == 0
    assert "warning" not in capsys.readouterr().out
    assert bench.main(["--from", str(tmp_path / "noisy.json"), "--out", str(tmp_path)]) == 0
    warnings = [line for line in capsys.readouterr().out.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: 2 timings too noisy")
    for r, pct in ((noisy["rows"][1], "25.0%"), (noisy["rows"][-1], "11.0%")):
        assert (f"tiny {r['mode']} {r['dtype']} B={r['B']} H={r['H']} T={r['T']} I={r['I']} "
                f"{r['provider']} {pct}") in warnings[0]


def test_results_without_spread_still_load(tiny_run, tmp_path, capsys):
    """Files written before rows had "spread": it is taken from the timing's IQR where that
    was recorded, "-" where not; the saved run under benchmarks/results/ reprints and
    compares."""
    _, _, res = tiny_run
    old = copy.deepcopy(res)
    for r in old["rows"]:
        del r["spread"]
    del old["rows"][0]["timing"]["iqr_ms"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = bench.load_results(tmp_path / "old.json")
    assert loaded["rows"][0]["spread"] is None
    assert [r["spread"] for r in loaded["rows"][1:]] == pytest.approx(
        [r["spread"] for r in res["rows"][1:]])
    assert bench.main(["--from", str(tmp_path / "old.json"), "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    first = lines[next(i for i, line in enumerate(lines) if line.startswith("grid")) + 2]
    assert f"{res['rows'][0]['median_ms']:.3f}       - " in first

    saved = bench.load_results(SAVED_RUN)
    assert all(r["spread"] > 0 for r in saved["rows"] if r["status"] == "ok")
    assert bench.main(["--from", str(SAVED_RUN), "--compare", str(SAVED_RUN),
                       "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "same speed as the old run" in text and "warning: different" not in text


def test_plot_written(tiny_run):
    _, out, _ = tiny_run
    pytest.importorskip("matplotlib")
    assert (out / "speedup.png").stat().st_size > 1000


def test_wrong_provider_is_reported_not_timed():
    """A provider computing the wrong thing gets status WRONG and no timing."""

    class Wrong(torch.nn.Module):
        def __init__(self, gru):
            super().__init__()
            self.gru = gru

        def forward(self, x, h0):
            y, hn = self.gru(x, h0)
            return y * (1 + 1e-3), hn  # a 1e-3 relative error: far over the fp32 budget

    wrong = bench.Provider("wrong", "fusedgru", Wrong)
    case = bench.Case("tiny", 2, 5, 3, 4, mode="inference")
    rows = bench.run_cell(case, [bench.discover_providers(CPU, [])[0][0], wrong], CPU,
                          bench.RunOptions(timing=bench.TimingOptions(quick=True)))
    base, bad = rows
    assert base["provider"] == "nn.GRU" and base["status"] == "ok"
    assert bad["status"] == "WRONG" and "y:" in bad["reason"]
    assert bad["median_ms"] is None and bad["speedup_vs_nn_gru"] is None
    assert "WRONG" in bench.format_table(rows, "cpu")


def test_gradient_error_is_caught():
    """A backward that is wrong (forward right) fails the training check."""

    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    class WrongGrad(torch.nn.Module):
        def __init__(self, gru):
            super().__init__()
            self.gru = gru

        def forward(self, x, h0):
            return self.gru(Scale.apply(x), h0)

    case = bench.Case("tiny", 2, 5, 3, 4, mode="train")
    data = bench.make_cell_data(case, CPU)
    report = bench.check_provider(bench.Provider("wg", "fusedgru", WrongGrad), case, data, 64)
    assert not report.ok and "dx" in report.failures and "y" not in report.failures


def test_providers_come_from_the_table():
    providers, left_out = bench.discover_providers(CPU, None, quick=True)
    names = [p.name for p in providers]
    assert names[0] == "nn.GRU"
    assert "triton" not in names  # the interpreter is never timed unless asked for
    assert "reference" in names or "cpu" in names
    from fusedgru import backends

    for name in backends.BACKENDS:
        assert name in names or name in left_out


def test_list_and_bad_arguments(capsys):
    assert bench.main(["--grid", "cpu", "--list"]) == 0
    assert "cells" in capsys.readouterr().out
    assert bench.main(["--grid", "nope", "--list"]) == 2
    assert bench.main(["--backends", "nope", "--list"]) == 2
    assert bench.main(["--dtype", "int8", "--list"]) == 2


def test_grids_match_spec():
    stream = bench.grid_cases("stream")
    assert len(stream) == 4 * 3 * 2 * 2 and {c.T for c in stream} == {1024}
    deep = bench.grid_cases("deep")
    assert all(c.layers == 2 and c.bidirectional and c.mode == "train" for c in deep)
    d2l = bench.grid_cases("d2l")
    assert [(c.B, c.H, c.T, c.I, c.dtype) for c in d2l] == [(32, 256, 35, 28, "float32")]
    assert len(bench.grid_cases("cpu")) == 16
    assert len(bench.grid_cases("cpu", quick=True)) < 16


@pytest.mark.parametrize("layers,bidirectional,bias", [(1, False, True), (2, True, True),
                                                       (2, False, False)])
def test_onnxruntime_provider_computes_nn_gru(layers, bidirectional, bias, gen):
    """The ONNX Runtime provider's weight mapping (gates z, r, n; B = [Wb, Rb]; one GRU node
    per layer, h0 sliced per layer) gives nn.GRU's outputs on new batch sizes and lengths."""
    pytest.importorskip("onnxruntime", reason="the ONNX Runtime provider needs the test extra")
    from fusedgru.bench.providers import OnnxRuntimeGRU

    gru = torch.nn.GRU(5, 4, layers, bias=bias, bidirectional=bidirectional).eval()
    ort_gru = OnnxRuntimeGRU(gru)
    D = 2 if bidirectional else 1
    for T, B in ((3, 2), (7, 5)):
        x = torch.randn(T, B, 5, generator=gen)
        h0 = torch.randn(layers * D, B, 4, generator=gen)
        with torch.no_grad():
            want = gru(x, h0)
        for got, w in zip(ort_gru(x, h0), want):
            torch.testing.assert_close(got, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,T", [("inference", 1), ("train", 4)])
def test_cells_called_step_by_step(mode, T):
    """Case.call == "cell": every provider's GRUCell in a Python loop, checked against the
    float64 oracle (gradients by nn.GRU's parameter names) and timed; providers without a
    cell sit it out."""
    case = bench.Case("cells", 3, 5, T, 4, dtype="float32", mode=mode, call="cell")
    providers, _ = bench.discover_providers(CPU, ["nn.GRU", "reference", "ref+compile"])
    rows = bench.run_cell(case, providers, CPU, bench.RunOptions())
    by = {r["provider"]: r for r in rows}
    for name in ("nn.GRU", "reference"):
        assert by[name]["status"] == "ok", by[name]
        assert by[name]["call"] == "cell" and by[name]["median_ms"] > 0
        assert by[name]["check"]["ok"]
        if mode == "train":
            assert "d.weight_hh_l0" in by[name]["check"]["errors"]
    assert by["ref+compile"]["status"] == "skipped"
    assert "no single-step cell" in by["ref+compile"]["reason"]


def test_single_step_grids_and_old_rows_without_call():
    calls = bench.grid_cases("calls")
    assert {c.T for c in calls} == {1} and {c.call for c in calls} == {"seq"}
    assert {(c.B, c.H) for c in calls} == {(b, h) for b in (1, 8, 64) for h in (64, 256, 1024)}
    assert {c.call for c in bench.grid_cases("cells")} == {"cell"}
    assert {(c.T, c.mode) for c in bench.grid_cases("cell-loop")} == {(32, "train")}
    res = bench.load_results(SAVED_RUN)  # written before Case.call existed
    assert {r["call"] for r in res["rows"]} == {"seq"}
