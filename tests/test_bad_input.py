"""Every input torch.nn.GRU rejects is rejected with an exception that names the argument
and what was expected; and the backend table answers clearly for unknown/missing backends."""

import pytest
import torch

import fusedgru
from fusedgru import FusedGRU, FusedGRUCell, backends, functional

F64 = torch.float64


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(input_size=0), ValueError, r"input_size: expected a positive int, got 0"),
    (dict(hidden_size=-3), ValueError, r"hidden_size: expected a positive int, got -3"),
    (dict(num_layers=0), ValueError, r"num_layers: expected a positive int, got 0"),
    (dict(hidden_size=2.5), TypeError, r"hidden_size: expected a positive int, got float"),
    (dict(dropout=1.5), ValueError, r"dropout: expected a float in \[0, 1\], got 1.5"),
    (dict(dropout=-0.1), ValueError, r"dropout: expected a float in \[0, 1\]"),
    (dict(dropout=float("nan")), ValueError, r"dropout: expected a float in \[0, 1\]"),
    (dict(dropout="0.1"), TypeError, r"dropout: expected a float"),
    (dict(batch_first="yes"), TypeError, r"batch_first: expected a bool"),
    (dict(reset_after=None), TypeError, r"reset_after: expected a bool"),
    (dict(backend="cudnn"), ValueError, r"backend: unknown backend 'cudnn'; expected 'auto' or"),
])
def test_bad_constructor_arguments(kwargs, exc, match):
    args = dict(input_size=3, hidden_size=4)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        FusedGRU(**args)


def test_bad_cell_arguments():
    with pytest.raises(ValueError, match="hidden_size: expected a non-negative int, got -1"):
        FusedGRUCell(3, -1)
    with pytest.raises(ValueError, match="backend: unknown backend"):
        FusedGRUCell(3, 4, backend="fast")


def test_dropout_with_one_layer_warns_like_nn_gru():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        FusedGRU(3, 4, dropout=0.2)


@pytest.fixture
def gru():
    return FusedGRU(3, 4, num_layers=2, dtype=F64, backend="reference")


def r(*shape, dtype=F64, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


@pytest.mark.parametrize("make_input,make_hx,exc,match", [
    (lambda: r(2, 3, 3, 3), None, ValueError, r"input: expected a 2-D .* or 3-D .*got 4-D"),
    (lambda: r(3), None, ValueError, r"input: expected a 2-D .*got 1-D"),
    (lambda: r(5, 2, 7), None, ValueError, r"input: expected input.size\(-1\) == input_size = 3, got 7"),
    (lambda: r(0, 2, 3), None, ValueError, r"input: expected a sequence of at least one step"),
    (lambda: r(5, 2, 3), lambda: r(2, 2, 5), ValueError, r"hx: expected shape \(2, 2, 4\) .*got \(2, 2, 5\)"),
    (lambda: r(5, 2, 3), lambda: r(1, 2, 4), ValueError, r"hx: expected shape \(2, 2, 4\)"),
    (lambda: r(5, 2, 3), lambda: r(2, 4), ValueError,
     r"hx: expected a 3-D tensor of shape \(2, 2, 4\) for the batched 3-D input, got a 2-D"),
    (lambda: r(5, 3), lambda: r(2, 1, 4), ValueError,
     r"hx: expected a 2-D tensor of shape \(2, 4\) for the unbatched 2-D input, got a 3-D"),
    (lambda: r(5, 2, 3, dtype=torch.float32), None, TypeError,
     r"input: expected dtype torch.float64 \(the dtype of the weights\), got torch.float32"),
    (lambda: torch.randint(0, 3, (5, 2, 3)), None, TypeError, r"input: expected a floating-point dtype"),
    (lambda: r(5, 2, 3), lambda: r(2, 2, 4, dtype=torch.float32), TypeError,
     r"hx: expected dtype torch.float64 \(the dtype of input\), got torch.float32"),
    (lambda: r(5, 2, 3, device="meta"), None, RuntimeError,
     r"input: expected a tensor on cpu \(the device of the weights\), got one on meta"),
    (lambda: r(5, 2, 3), lambda: r(2, 2, 4, device="meta"), RuntimeError,
     r"hx: expected a tensor on cpu .*got one on meta"),
    (lambda: [[1.0, 2.0, 3.0]], None, TypeError, r"input: expected a Tensor or PackedSequence, got list"),
    (lambda: r(5, 2, 3), lambda: [0.0], TypeError, r"hx: expected a Tensor, got list"),
])
def test_bad_forward_inputs(gru, make_input, make_hx, exc, match):
    hx = make_hx() if make_hx else None
    with pytest.raises(exc, match=match):
        gru(make_input(), hx)


def test_weights_with_mixed_dtypes_or_devices_rejected():
    g = FusedGRU(3, 4, num_layers=2, backend="reference")
    g.weight_hh_l1.data = g.weight_hh_l1.data.double()
    with pytest.raises(TypeError, match=r"weight_hh_l1: expected dtype torch.float32"):
        g(torch.randn(5, 2, 3))
    g = FusedGRU(3, 4, backend="reference")
    g.bias_hh_l0 = torch.nn.Parameter(torch.empty(12, device="meta"))
    with pytest.raises(RuntimeError, match=r"bias_hh_l0: expected a tensor on cpu"):
        g(torch.randn(5, 2, 3))


def test_functional_rejects_wrong_weight_lists():
    w = FusedGRU(3, 4, num_layers=2)._flat_weights
    with pytest.raises(ValueError, match=r"weights: expected 4 \(no bias\) or 8 tensors"):
        functional.gru(torch.randn(5, 2, 3), w[:3], num_layers=2 // 2 + 1)
    with pytest.raises(ValueError, match=r"weight_ih_l1: expected shape \(12, 4\), got \(12, 3\)"):
        functional.gru(torch.randn(5, 2, 3), w[:4] + [w[0]] + w[5:], num_layers=2)


def test_cell_bad_inputs():
    c = FusedGRUCell(3, 4, backend="reference")
    with pytest.raises(ValueError, match=r"input: expected a 1-D .* or 2-D .*got 3-D"):
        c(torch.randn(1, 2, 3))
    with pytest.raises(ValueError, match=r"hx: expected a 2-D tensor to match the 2-D input, got 1-D"):
        c(torch.randn(2, 3), torch.randn(4))
    with pytest.raises(ValueError, match=r"hx: expected shape \(2, 4\) \(B, H\), got \(2, 5\)"):
        c(torch.randn(2, 3), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"hx: expected shape \(2, 4\) \(B, H\), got \(3, 4\)"):
        c(torch.randn(2, 3), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"hx: expected shape \(4,\) \(H,\) for the unbatched input, got \(5,\)"):
        c(torch.randn(3), torch.randn(5))
    with pytest.raises(ValueError, match=r"input: expected input.size\(-1\) == input_size = 3"):
        c(torch.randn(2, 6))


def test_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="backend: unknown backend 'nope'"):
        backends.get_backend("nope")
    assert "reference" in fusedgru.available_backends()
    status = fusedgru.backend_status()
    assert set(status) == set(backends.BACKEND_NAMES)
    for name, why in status.items():
        if why is None:
            continue
        with pytest.raises(fusedgru.BackendUnavailableError, match=f"backend '{name}' is not available: .*To get it: "):
            backends.get_backend(name)
        g = FusedGRU(3, 4, backend=name)
        assert "unavailable" in repr(g)
        with pytest.raises(fusedgru.BackendUnavailableError, match=name):
            g(torch.randn(2, 1, 3))
    with pytest.raises(fusedgru.BackendUnavailableError, match="cannot run torch.int64"):
        backends.resolve_backend("reference", torch.device("cpu"), torch.int64)
