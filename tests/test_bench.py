"""`fusedgru bench` (fusedgru/bench.py) at tiny sizes: the table, results.json, --compare,
--from, and that a wrong provider is reported and never timed."""

import copy
import json

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


def test_table_and_compare(tiny_run, tmp_path, capsys):
    _, out, res = tiny_run
    # an "old" run where every provider took twice as long
    old = copy.deepcopy(res)
    for r in old["rows"]:
        r["median_ms"] *= 2
    (tmp_path / "old.json").write_text(json.dumps(old))
    rc = bench.main(["--from", str(out / "results.json"), "--compare", str(tmp_path / "old.json"),
                     "--out", str(tmp_path)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "vs nn.GRU" in text and "us/step" in text and "median ms" in text
    assert "training memory vs nn.GRU" in text
    assert "compare:" in text
    changes = [line for line in text.splitlines() if line.rstrip().endswith(
        tuple("0123456789")) and " 2.00x " in line]
    assert len(changes) == len(res["rows"]), text  # every cell 2x faster than "old"


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
