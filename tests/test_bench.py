"""`fusedgru bench` (fusedgru/bench/) at tiny sizes: the table, results.json, --compare,
--from, the spread of each timing, and that a wrong provider is reported and never timed."""

import copy
import json
from pathlib import Path

import pytest
import torch

import fusedgru
from fusedgru import bench
from fusedgru.bench.cells import make_io

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
        # the arithmetic of the row: strict float32 on the CPU, the dtype otherwise
        assert r["precision"] == ("ieee" if r["dtype"] == "float32" else r["dtype"])
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


class _WrongGradient(torch.autograd.Function):
    """The identity forward whose backward is 1% off: a provider built on it computes the
    right outputs and a wrong gradient of what it is applied to."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        return g * 1.01


def test_gradient_error_is_caught():
    """A backward that is wrong (forward right) fails the training check."""

    class WrongGrad(torch.nn.Module):
        def __init__(self, gru):
            super().__init__()
            self.gru = gru

        def forward(self, x, h0):
            return self.gru(_WrongGradient.apply(x), h0)

    case = bench.Case("tiny", 2, 5, 3, 4, mode="train")
    data = bench.make_cell_data(case, CPU)
    report = bench.check_provider(bench.Provider("wg", "fusedgru", WrongGrad), case, data, 64)
    assert not report.ok and "dx" in report.failures and "y" not in report.failures


@pytest.mark.parametrize("call", ["seq", "cell"])
def test_frozen_input_training_cells(call):
    """Mode "train-frozen-input": a grid with train cells has them when asked for (and only
    then); the input takes no gradient, so dx is neither computed nor compared, and the
    weight gradients are still checked: a wrong one fails the check."""
    assert not any(c.mode == "train-frozen-input" for c in bench.grid_cases("cpu"))
    frozen = bench.grid_cases("cpu", modes=["train-frozen-input"])
    assert frozen and all(c.mode == "train-frozen-input" for c in frozen)
    assert not bench.grid_cases("calls", modes=["train-frozen-input"])  # no train cells
    case = bench.Case("tiny", 2, 5, 3, 4, mode="train-frozen-input", call=call)
    data = bench.make_cell_data(case, CPU)
    io = make_io(case, data, torch.float32, grad=True)
    assert not io.x.requires_grad and io.h0.requires_grad
    names = ["nn.GRU", "reference"] + (["cpu"] if "cpu" in fusedgru.available_backends() else [])
    providers, _ = bench.discover_providers(CPU, names)
    rows = bench.run_cell(case, providers, CPU,
                          bench.RunOptions(timing=bench.TimingOptions(quick=True)))
    for r in rows:
        assert r["status"] == "ok" and r["mode"] == "train-frozen-input", r
        assert "dx" not in r["check"]["errors"] and "d.weight_ih_l0" in r["check"]["errors"]

    class Wrong(torch.nn.Module):
        def __init__(self, gru):
            super().__init__()
            self.gru = gru

        def forward(self, x, h0):
            w = dict(self.gru.named_parameters())
            w["weight_ih_l0"] = _WrongGradient.apply(w["weight_ih_l0"])
            return torch.func.functional_call(self.gru, w, (x, h0))

    if call == "seq":
        report = bench.check_provider(bench.Provider("w", "fusedgru", Wrong), case, data, 64)
        assert not report.ok and "d.weight_ih_l0" in report.failures, report.failures


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


# --- sequence structure inside the batch (issue 19): the packed and rollout grids ---------

from fusedgru.bench import sequences  # noqa: E402
from fusedgru.bench.rollout import MaskedCellLoopGRU, MaskedLoopGRU, SegmentsGRU  # noqa: E402


def test_packed_and_rollout_grids():
    """The packed grid: the skewed case (one sequence of 400 steps, 63 of 10), lognormal
    lengths at H 256 and 64 and 2 layers bidirectional, B=64, unsorted by default; the
    rollout grid: B=64 envs, T=128, H=I=256; both modes, float32; neither in --grid all."""
    packed = bench.grid_cases("packed")
    shapes = {(c.lengths, c.B, c.H, c.T, c.I, c.layers, c.bidirectional) for c in packed}
    assert shapes == {("skewed", 64, 256, 400, 256, 1, False),
                      ("lognormal", 64, 256, 512, 256, 1, False),
                      ("lognormal", 64, 64, 512, 64, 1, False),
                      ("lognormal", 64, 256, 512, 256, 2, True)}
    assert {(c.call, c.packing, c.dtype) for c in packed} == {("packed", "unsorted", "float32")}
    assert {c.mode for c in packed} == {"inference", "train"} and len(packed) == 8
    both = bench.grid_cases("packed", quick=True, packings=("sorted", "unsorted"))
    assert {c.packing for c in both} == {"sorted", "unsorted"} and len(both) == 8
    rollout = bench.grid_cases("rollout")
    assert {(c.B, c.T, c.H, c.I, c.layers, c.call, c.lengths) for c in rollout} == {
        (64, 128, 256, 256, 1, "rollout", "geometric")}
    assert {c.mode for c in rollout} == {"inference", "train"}
    assert "packed" not in bench.ALL and "rollout" not in bench.ALL
    assert len({c.key() for c in both}) == len(both)  # packing and lengths are in the key


def test_lengths_and_resets_are_fixed():
    """Every run uses the same lengths and resets (Python's own generator, a fixed seed)."""
    skewed = sequences.draw_lengths("skewed", 64, 400)
    assert skewed[21] == 400 and sorted(skewed[:21] + skewed[22:]) == [10] * 63
    lengths = sequences.draw_lengths("lognormal", 64, 512)
    assert lengths[:6] == [63, 88, 42, 41, 31, 512] and sum(lengths) == 3517
    assert min(lengths) >= 1 and max(lengths) == 512
    assert sequences.draw_lengths("lognormal", 64, 512, sort=True) == sorted(lengths, reverse=True)
    resets = sequences.draw_resets("geometric", 128, 64)
    assert resets.shape == (128, 64) and resets.dtype == torch.bool
    assert not resets[0].any() and int(resets.sum()) == 385
    assert torch.equal(resets, sequences.draw_resets("geometric", 128, 64))
    info = sequences.describe(resets=resets)
    assert info["episodes"] == 385 + 64 and 15 < info["mean_episode"] < 25


@pytest.mark.parametrize("packing", ["sorted", "unsorted"])
def test_packed_cell_inputs(packing):
    """A packed cell's inputs: the PackedSequence of the cell's lengths (rows longest first
    when sorted), its data the grad leaf, gy packed the same way; the check's first steps
    clip the lengths."""
    case = bench.Case("packed", 6, 8, 64, 5, call="packed", lengths="lognormal",
                      packing=packing, mode="train")
    data = bench.make_cell_data(case, CPU)
    lengths = data.lengths.tolist()
    assert lengths == sequences.draw_lengths("lognormal", 6, 64, sort=packing == "sorted")
    assert data.seq["tokens"] == sum(lengths) and data.seq["longest"] == max(lengths)
    from fusedgru.bench.cells import make_io

    io = make_io(case, data, torch.float32, grad=True)
    packed = io.args[0]
    assert isinstance(packed, torch.nn.utils.rnn.PackedSequence)
    assert packed.data is io.x and io.x.requires_grad and io.x.shape == (sum(lengths), 5)
    assert (packed.sorted_indices is None) == (packing == "sorted")
    assert int(packed.batch_sizes.sum()) == sum(lengths) and io.gy.shape == (sum(lengths), 8)
    want = torch.nn.utils.rnn.pack_padded_sequence(data.x.float(), data.lengths,
                                                   enforce_sorted=False)
    torch.testing.assert_close(torch.nn.utils.rnn.pad_packed_sequence(packed)[0],
                               torch.nn.utils.rnn.pad_packed_sequence(want)[0])
    clipped = make_io(case, data, torch.float32, steps=10).args[0]
    assert int(clipped.batch_sizes.sum()) == sum(min(n, 10) for n in lengths)


def _cell_loop_with_resets(gru, x, hx, resets):
    """An independent oracle: nn.GRUCell per layer and step, the state zeroed where a
    sequence starts (torch.where, not a product)."""
    cells = []
    for layer in range(gru.num_layers):
        cell = torch.nn.GRUCell(gru.input_size if layer == 0 else gru.hidden_size,
                                gru.hidden_size, dtype=x.dtype)
        cell.load_state_dict({k[:-3]: v for k, v in gru.state_dict().items()
                              if k.endswith(f"_l{layer}")})
        cells.append(cell)
    h = list(hx.unbind(0))
    ys = []
    for t in range(x.shape[0]):
        inp = x[t]
        for layer, cell in enumerate(cells):
            prev = torch.where(resets[t].unsqueeze(1), torch.zeros_like(h[layer]), h[layer])
            h[layer] = inp = cell(inp, prev)
        ys.append(inp)
    return torch.stack(ys), torch.stack(h)


def _rollout_grads(fn, x, hx, gy, ghn, params):
    x = x.detach().requires_grad_(True)
    hx = hx.detach().requires_grad_(True)
    y, hn = fn(x, hx)
    grads = torch.autograd.grad((y, hn), [x, hx, *params], (gy, ghn))
    return [y.detach(), hn.detach(), *grads]


@pytest.mark.parametrize("layers,how", [(1, "pack"), (1, "pad"), (2, "pack"), (2, "cells")])
def test_segments_equal_masked_loop(layers, how, gen):
    """nn.GRU over the episodes (the first one of each row from its hx, the others from
    zeros), and the masked loop through nn.GRUCell, give the masked loop's outputs, h_n and
    every gradient; so does the masked loop an independent GRUCell loop.  Resets at t = 0, at the last step, two in a row,
    a row without any."""
    T, B, I, H = 9, 5, 3, 4
    gru = torch.nn.GRU(I, H, layers, dtype=torch.float64)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    hx = torch.randn(layers, B, H, generator=gen, dtype=torch.float64)
    gy = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    ghn = torch.randn(layers, B, H, generator=gen, dtype=torch.float64)
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[0, 1] = resets[4, 1] = resets[5, 1] = resets[8, 2] = resets[3, 3] = True
    resets[:, 4] = True  # every step a new sequence

    loop = MaskedLoopGRU.from_gru(gru)
    seg = (MaskedCellLoopGRU.from_gru(gru) if how == "cells" else SegmentsGRU.from_gru(gru, how))
    assert [n for n, _ in seg.named_parameters()] == [n for n, _ in gru.named_parameters()]
    want = _rollout_grads(lambda a, b: loop(a, b, resets=resets), x, hx, gy, ghn,
                          list(loop.parameters()))
    cells = _rollout_grads(lambda a, b: _cell_loop_with_resets(loop, a, b, resets), x, hx, gy,
                           ghn, [])
    for a, b in zip(cells[:4], want[:4]):
        torch.testing.assert_close(a, b)
    got = _rollout_grads(lambda a, b: seg(a, b, resets=resets), x, hx, gy, ghn,
                         list(seg.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    # no gradient reaches hx of a row that resets at t = 0 or of the always-resetting row
    assert got[3][:, 1].abs().max() == 0 and got[3][:, 4].abs().max() == 0
    assert got[3][:, 0].abs().max() > 0


def test_segment_rollout_indices():
    """The episodes of a small rollout, by hand: which row, how long, which carry hx, the
    last of each row, and the packed layout (longest first)."""
    resets = torch.tensor([[False, True], [False, False], [True, False], [False, True],
                           [False, False]])  # (T=5, B=2)
    s = sequences.segment_rollout(resets)
    assert s.S == 4
    assert s.lengths.tolist() == [2, 3, 3, 2] and s.env.tolist() == [0, 0, 1, 1]
    assert s.carry.tolist() == [True, False, False, False]  # row 1 resets at t = 0
    assert s.last.tolist() == [1, 3]
    assert s.batch_sizes.tolist() == [4, 4, 2]
    assert s.sorted_indices.tolist() == [1, 2, 0, 3]
    x = torch.arange(10.0).view(2, 5).t()  # x[t, b] = 5 b + t
    flat = x.t().reshape(-1)
    packed = torch.empty(10)
    packed[s.packed_index] = flat
    segments = [flat[0:2], flat[2:5], flat[5:8], flat[8:10]]
    want = torch.nn.utils.rnn.pack_sequence(segments, enforce_sorted=False)
    assert packed.tolist() == want.data.tolist()
    assert torch.equal(want.sorted_indices, s.sorted_indices)


def test_sequence_grids_run_and_report(tmp_path, capsys):
    """tiny-packed and tiny-rollout through the command: every provider checked and timed
    (fusedgru's reference with resets= once FusedGRU takes it, else skipped with the
    reason), rollout rows against each peer and the fastest, the peer table printed."""
    out = tmp_path / "seq"
    rc = bench.main(["--grid", "tiny-packed,tiny-rollout", "--quick", "--backends", "reference",
                     "--mode", "train", "--out", str(out), "--no-progress", "--threads", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    rows = json.loads((out / "results.json").read_text())["rows"]
    packed = [r for r in rows if r["call"] == "packed" and r["status"] != "skipped"]
    assert {r["provider"] for r in packed} == {"nn.GRU", "reference"}
    for r in packed:
        assert r["status"] == "ok" and r["check"]["ok"], r
        assert r["seq"]["tokens"] == sum(r["seq"]["lengths"]) and r["speedup_vs"] is None
    roll = [r for r in rows if r["call"] == "rollout"]
    assert [r["provider"] for r in roll] == ["nn.GRU", "nn.GRUCell", "nn.GRU-pack", "nn.GRU-pad",
                                             "reference"]
    for r in roll:
        if r["provider"] == "reference" and r["status"] == "skipped":
            assert "resets" in r["reason"]
            continue
        assert r["status"] == "ok" and r["check"]["ok"], r
        assert set(r["speedup_vs"]) == {"nn.GRU", "nn.GRUCell", "nn.GRU-pack", "nn.GRU-pad"}
        best = min(x["median_ms"] for x in roll if x["kind"] in ("baseline", "peer"))
        assert r["speedup_vs_best"] == pytest.approx(best / r["median_ms"])
        assert r["speedup_vs"]["nn.GRU"] == pytest.approx(r["speedup_vs_nn_gru"])
        assert r["seq"]["episodes"] > 5
    assert "against every way of running nn.GRU and TorchRL" in text
    assert "skewed unsorted" in text and "geometric" in text


def test_old_results_have_no_sequence_fields():
    res = bench.load_results(SAVED_RUN)
    assert {(r["lengths"], r["packing"]) for r in res["rows"]} == {("", "")}


def test_providers_of_sequence_cells():
    """Packed runs leave out what takes no PackedSequence; rollout runs bring nn.GRU's
    other ways, and TorchRL's where it imports (named, or said why not)."""
    providers, left_out = bench.discover_providers(CPU, None, quick=True, calls=["packed"])
    names = [p.name for p in providers]
    assert names[0] == "nn.GRU" and "nn.GRU-pack" not in names
    assert "onnxruntime" not in names and "torchrl-pad" not in names
    providers, left_out = bench.discover_providers(CPU, None, quick=True, calls=["rollout"])
    names = [p.name for p in providers]
    assert names[:4] == ["nn.GRU", "nn.GRUCell", "nn.GRU-pack", "nn.GRU-pad"]
    for n in ("torchrl-pad", "torchrl-scan", "torchrl-py"):
        assert n in names or "torchrl" in left_out[n]
    providers, _ = bench.discover_providers(CPU, ["reference"], calls=["rollout"])
    assert [p.name for p in providers] == ["nn.GRU", "nn.GRUCell", "nn.GRU-pack", "nn.GRU-pad",
                                           "reference"]


@pytest.mark.parametrize("backend", ["pad", "scan", "py"])
def test_torchrl_is_init_equals_resets(backend, gen):
    """TorchRL's is_init (with zeros stored as the state of every step but the first) is
    our resets: its GRUModule gives the masked loop's outputs, h_n and gradients."""
    pytest.importorskip("torchrl", reason="torchrl is not installed (pip install torchrl): "
                                          "the TorchRL rollout provider is optional")
    from fusedgru.bench.rollout import TorchRLGRU

    T, B, I, H, layers = 9, 4, 3, 5, 2
    gru = torch.nn.GRU(I, H, layers, dtype=torch.float64)
    x = torch.randn(T, B, I, generator=gen, dtype=torch.float64)
    hx = torch.randn(layers, B, H, generator=gen, dtype=torch.float64)
    gy = torch.randn(T, B, H, generator=gen, dtype=torch.float64)
    ghn = torch.randn(layers, B, H, generator=gen, dtype=torch.float64)
    resets = torch.zeros(T, B, dtype=torch.bool)
    resets[0, 1] = resets[3, 0] = resets[4, 0] = resets[8, 2] = True
    loop = MaskedLoopGRU.from_gru(gru)
    trl = TorchRLGRU(gru, backend)
    want = _rollout_grads(lambda a, b: loop(a, b, resets=resets), x, hx, gy, ghn,
                          list(loop.parameters()))

    def batch_first(a, b):
        y, hn = trl(a.transpose(0, 1), b, resets=resets.t())
        return y.transpose(0, 1), hn

    got = _rollout_grads(batch_first, x, hx, gy, ghn, list(trl.parameters()))
    assert [n.rsplit(".", 1)[-1] for n, _ in trl.named_parameters()] == [
        n for n, _ in loop.named_parameters()]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------
# Interleaved timing rounds (fusedgru.bench.timing.time_rounds): every provider of a cell
# is timed once per round, in turn, so that a burst of noise on a shared machine hits
# every provider's figure alike.
# ---------------------------------------------------------------------------------------

def test_rows_record_their_rounds(tiny_run):
    """Each timed row is the median of opts.rounds round medians (3 by default), all
    recorded; the run's meta says how many rounds."""
    _, _, res = tiny_run
    assert res["meta"]["timing_rounds"] == 3
    for r in res["rows"]:
        rounds = r["timing"]["rounds_ms"]
        assert len(rounds) == 3 and all(v > 0 for v in rounds)
        assert r["median_ms"] == pytest.approx(sorted(rounds)[1])
        assert "interleaved rounds" in r["timing"]["method"]


def test_time_rounds_interleaves_and_isolates_a_failure():
    """Round r times fn 0, then fn 1, then fn 2, before round r + 1 starts; a fn that raises
    in round 2 is reported once and sits out round 3, the others are still timed."""
    log = []

    def make(i):
        def fn():
            log.append(i)
        return fn

    def bad():
        log.append(2)
        if _runs(log).count(2) >= 2:  # its first call of round 2
            raise RuntimeError("out of memory (injected)")

    errors = []
    opts = bench.TimingOptions(quick=True, rounds=3)
    res = bench.time_rounds([make(0), make(1), bad], CPU, opts,
                            on_error=lambda i, exc: errors.append((i, str(exc))))
    assert _runs(log)[:6] == [0, 1, 2, 0, 1, 2], _runs(log)
    assert _runs(log)[6:] == [0, 1], "the failed fn must sit out the rounds after"
    assert errors == [(2, "out of memory (injected)")]
    assert res[2] is None
    for ms, details in res[:2]:
        assert ms > 0 and len(details["rounds_ms"]) == 3 and details["iqr_ms"] >= 0


def _runs(log):
    """The log with repeats collapsed: [0, 0, 1, 1, 0] -> [0, 1, 0]."""
    return [x for k, x in enumerate(log) if k == 0 or log[k - 1] != x]


def test_rounds_option(tmp_path, capsys):
    """--rounds 1 times each provider once (the bench before rounds); --rounds 0 is refused
    with exit status 2."""
    assert bench.main(["--grid", "tiny", "--quick", "--backends", "reference", "--rounds", "1",
                       "--out", str(tmp_path), "--no-progress", "--threads", "1"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["timing_rounds"] == 1
    assert all(len(r["timing"]["rounds_ms"]) == 1 for r in res["rows"])
    assert bench.main(["--grid", "tiny", "--rounds", "0", "--out", str(tmp_path)]) == 2
    assert "--rounds must be >= 1" in capsys.readouterr().err
