"""torch.onnx.export of models holding FusedGRU / FusedGRUCell, with torch's default
exporter (dynamo=True) and the TorchScript-based one (dynamo=False): the graph holds ONNX's
standard GRU operator, one node per layer (linear_before_reset=1 for reset_after=True, 0
for reset_after=False), and onnxruntime runs it to FusedGRU's outputs on inputs of another
batch size and length than the export's (dynamic axes)."""

import warnings

import pytest
import torch
from torch import nn

from fusedgru import FusedGRU, FusedGRUCell
from fusedgru.onnx import _onnx_weights, gru_onnx_reference

onnx = pytest.importorskip("onnx", reason="the ONNX tests need the test extra: pip install -e '.[test]'")
ort = pytest.importorskip("onnxruntime", reason="the ONNX tests need the test extra: pip install -e '.[test]'")


class Tagger(nn.Module):
    def __init__(self, reset_after, bidirectional, batch_first, bias):
        super().__init__()
        self.gru = FusedGRU(4, 5, num_layers=2, bias=bias, batch_first=batch_first,
                            bidirectional=bidirectional, reset_after=reset_after)
        self.head = nn.Linear(10 if bidirectional else 5, 3)

    def forward(self, x, h0=None):
        y, h_n = self.gru(x, h0)
        return self.head(y), h_n


def _export(model, args, names, dynamic, path, dynamo):
    kwargs = dict(input_names=names, output_names=["y", "h_n"])
    if dynamo:
        kwargs.update(dynamo=True, external_data=False,
                      dynamic_shapes=tuple(dynamic[n] for n in names))
    else:
        axes = dict(dynamic)
        axes.update(y=dynamic[names[0]], h_n={1: "batch"})
        kwargs.update(dynamo=False, dynamic_axes={k: v for k, v in axes.items() if k in names + ["y", "h_n"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, str(path), **kwargs)
    return onnx.load(str(path))


def _gru_nodes(model):
    return [n for n in model.graph.node if n.op_type == "GRU"]


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


EXPORTERS = [pytest.param(True, id="dynamo"), pytest.param(False, id="torchscript")]


@pytest.mark.parametrize("dynamo", EXPORTERS)
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
@pytest.mark.parametrize("case", ["bi-batch_first-h0", "uni-time_major-no_h0-no_bias"])
def test_export_is_onnx_gru_and_runs_in_onnxruntime(dynamo, reset_after, case, tmp_path, gen):
    bidirectional, batch_first, with_h0 = case.startswith("bi"), "batch_first" in case, "-h0" in case
    model = Tagger(reset_after, bidirectional, batch_first, bias="no_bias" not in case).eval()
    D = 2 if bidirectional else 1

    def inputs(B, T):
        x = torch.randn(*((B, T) if batch_first else (T, B)), 4, generator=gen)
        return (x, torch.randn(2 * D, B, 5, generator=gen)) if with_h0 else (x,)

    names = ["x", "h0"] if with_h0 else ["x"]
    bdim, tdim = (0, 1) if batch_first else (1, 0)
    dynamic = {"x": {bdim: "batch", tdim: "seq"}, "h0": {1: "batch"}}
    graph = _export(model, inputs(3, 6), names, dynamic, tmp_path / "m.onnx", dynamo)

    nodes = _gru_nodes(graph)
    assert len(nodes) == 2, [n.op_type for n in graph.node]
    for node in nodes:
        assert _attr(node, "linear_before_reset") == (1 if reset_after else 0)
        assert _attr(node, "direction") == (b"bidirectional" if bidirectional else b"forward")
        assert _attr(node, "hidden_size") == 5

    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    new = inputs(2, 9)  # another batch size and length than the export's
    got = session.run(None, {n: t.numpy() for n, t in zip(names, new)})
    with torch.no_grad():
        want = model(*new)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamo", EXPORTERS)
def test_cell_exports_as_a_one_step_gru(dynamo, tmp_path, gen):
    cell = FusedGRUCell(4, 5).eval()

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = cell

        def forward(self, x, h):
            h = self.cell(x, h)
            return h, h

    dynamic = {"x": {0: "batch"}, "h0": {0: "batch"}}
    graph = _export(Step(), (torch.randn(3, 4), torch.randn(3, 5)), ["x", "h0"],
                    dynamic, tmp_path / "c.onnx", dynamo)
    assert len(_gru_nodes(graph)) == 1
    session = ort.InferenceSession(str(tmp_path / "c.onnx"), providers=["CPUExecutionProvider"])
    x, h = torch.randn(2, 4, generator=gen), torch.randn(2, 5, generator=gen)
    got = session.run(None, {"x": x.numpy(), "h0": h.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), cell(x, h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_onnx_weight_layout_and_definition_match_fusedgru(reset_after, gen):
    """The layout mapping (gates z, r, n; B = [Wb, Rb]) and ONNX's GRU definition, in
    float64, without an exporter: FusedGRU's layer equals ONNX's operator on the mapped
    weights."""
    g = FusedGRU(3, 4, bidirectional=True, dtype=torch.float64, reset_after=reset_after,
                 backend="reference")
    x = torch.randn(5, 2, 3, dtype=torch.float64, generator=gen)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, generator=gen)
    W, R, B = _onnx_weights(g.all_weights, 4)
    Y, Y_h = gru_onnx_reference(x, W, R, B, h0, 1 if reset_after else 0)
    y, h_n = g(x, h0)
    torch.testing.assert_close(Y.transpose(1, 2).reshape(5, 2, 8), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(Y_h, h_n, rtol=1e-12, atol=1e-12)


def test_packed_input_says_it_cannot_export(tmp_path):
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = FusedGRU(4, 5)

        def forward(self, x, lengths):
            return self.gru(pack_padded_sequence(x, lengths, enforce_sorted=False))[1]

    with pytest.raises(Exception, match="PackedSequence input is not supported"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(Packed(), (torch.randn(6, 2, 4), torch.tensor([6, 3])),
                              str(tmp_path / "p.onnx"), dynamo=False)
