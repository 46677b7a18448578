"""fusedgru.to_fused / to_torch: every nn.GRU and nn.GRUCell of a model converted in place,
on the same Parameter objects, and back; FusedGRUCell.from_torch / to_torch."""

import pytest
import torch
from torch import nn

import fusedgru
from fusedgru import FusedGRU, FusedGRUCell


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
        self.rnn = nn.GRU(4, 6, num_layers=2, batch_first=True, bidirectional=True)
        self.heads = nn.ModuleList([nn.GRUCell(12, 5, bias=False), nn.Linear(12, 2)])

    def forward(self, x):
        y, h = self.rnn(self.encoder(x))
        return self.heads[0](y[:, -1]), self.heads[1](y).sum(), h


def _outputs(model, x):
    return [t.detach().clone() for t in model(x)]


def test_to_fused_and_back_keep_parameters_outputs_and_mode():
    torch.manual_seed(0)
    model = Model().double().eval()
    model.rnn.weight_ih_l1.requires_grad_(False)  # frozen stays frozen
    params = dict(model.named_parameters())
    x = torch.randn(2, 7, 3, dtype=torch.float64)
    expected = _outputs(model, x)

    out = fusedgru.to_fused(model)
    assert out is model
    assert type(model.rnn) is FusedGRU and type(model.heads[0]) is FusedGRUCell
    assert type(model.encoder[0]) is nn.Linear
    assert not model.rnn.training and model.rnn.batch_first and model.rnn.bidirectional
    # The same Parameter objects: an optimizer built before still drives the model.
    assert all(p is params[n] for n, p in model.named_parameters())
    assert not model.rnn.weight_ih_l1.requires_grad
    for got, want in zip(_outputs(model, x), expected):
        torch.testing.assert_close(got, want)

    fusedgru.to_torch(model)
    assert type(model.rnn) is nn.GRU and type(model.heads[0]) is nn.GRUCell
    assert all(p is params[n] for n, p in model.named_parameters())
    for got, want in zip(_outputs(model, x), expected):
        torch.testing.assert_close(got, want)


def test_an_optimizer_built_before_converting_trains_the_converted_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(3, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fusedgru.to_fused(model)
    before = model[0].weight_hh_l0.detach().clone()
    model[0](torch.randn(5, 2, 3))[0].sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight_hh_l0, before)


def test_a_gru_as_the_root_returns_its_twin():
    g = nn.GRU(3, 4).train(False)
    f = fusedgru.to_fused(g, backend="reference")
    assert type(f) is FusedGRU and f.backend == "reference" and not f.training
    assert f.weight_hh_l0 is g.weight_hh_l0
    back = fusedgru.to_torch(f)
    assert type(back) is nn.GRU and back.weight_hh_l0 is g.weight_hh_l0
    c = fusedgru.to_fused(nn.GRUCell(3, 4))
    assert type(c) is FusedGRUCell


def test_subclasses_and_reset_after_false_are_not_converted():
    class MyGRU(nn.GRU):
        pass

    m = nn.Sequential(MyGRU(3, 4))
    fusedgru.to_fused(m)
    assert type(m[0]) is MyGRU
    with pytest.raises(ValueError, match="reset_after: a FusedGRU with reset_after=False"):
        fusedgru.to_torch(nn.Sequential(FusedGRU(3, 4, reset_after=False)))
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        fusedgru.to_fused([nn.GRU(3, 4)])


def test_gru_types_cover_both_for_isinstance_loops():
    model = fusedgru.to_fused(Model())
    found = [m for m in model.modules() if isinstance(m, fusedgru.GRU_TYPES)]
    cells = [m for m in model.modules() if isinstance(m, fusedgru.GRU_CELL_TYPES)]
    assert found == [model.rnn] and cells == [model.heads[0]]


def test_cell_from_torch_and_to_torch():
    torch.manual_seed(0)
    t = nn.GRUCell(3, 4, dtype=torch.float64)
    f = FusedGRUCell.from_torch(t, backend="reference")
    assert f.weight_hh is not t.weight_hh  # from_torch copies
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    torch.testing.assert_close(f(x, h), t(x, h))
    back = f.to_torch()
    assert type(back) is nn.GRUCell
    torch.testing.assert_close(back(x, h), t(x, h))
    with pytest.raises(TypeError, match="cell: expected a torch.nn.GRUCell"):
        FusedGRUCell.from_torch(nn.GRU(3, 4))
    with pytest.raises(ValueError, match="reset_after"):
        FusedGRUCell(3, 4, reset_after=False).to_torch()


def test_quantize_dynamic_leaves_fused_modules_in_float():
    # What the README says: quantize_dynamic knows nn.GRU, not FusedGRU; convert back first.
    q = torch.ao.quantization.quantize_dynamic
    model = fusedgru.to_fused(nn.ModuleDict({"g": nn.GRU(4, 5), "l": nn.Linear(5, 3)}))
    qm = q(model, {nn.GRU, nn.Linear}, dtype=torch.qint8)
    assert type(qm["g"]) is FusedGRU and qm["g"].weight_hh_l0.dtype == torch.float32
    qm = q(fusedgru.to_torch(model), {nn.GRU, nn.Linear}, dtype=torch.qint8)
    assert type(qm["g"]).__module__.startswith("torch.ao.nn.quantized.dynamic")
