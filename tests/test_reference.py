"""The reference itself: vectorised layer vs torch.nn.GRU, textbook scratch GRU vs the
vectorised reset_after=False layer, hand-written backward vs autograd (all float64)."""

import pytest
import torch

from fusedgru import reference
from fusedgru.testing import make_layer_case, rel_err

SHAPES = [  # (T, B, I, H)
    (1, 1, 1, 1),
    (2, 3, 5, 3),
    (7, 5, 4, 17),
    (3, 1, 9, 100),
]


def _torch_layer(case):
    """torch.nn.GRU (one layer) holding the case's weights, in float64."""
    H = case.w_hh.shape[1]
    g = torch.nn.GRU(case.x.shape[2], H, bias=case.b_ih is not None, dtype=torch.float64)
    with torch.no_grad():
        g.weight_ih_l0.copy_(case.w_ih)
        g.weight_hh_l0.copy_(case.w_hh)
        if case.b_ih is not None:
            g.bias_ih_l0.copy_(case.b_ih)
            g.bias_hh_l0.copy_(case.b_hh)
    return g


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("with_h0", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_forward_matches_nn_gru(T, B, I, H, with_h0, bias, gen):
    case = make_layer_case(T, B, I, H, with_h0=with_h0, bias=bias, generator=gen)
    y, ws = reference.gru_layer_forward(case.x, case.h0, case.w_ih, case.w_hh, case.b_ih,
                                        case.b_hh, reset_after=True)
    h0 = case.h0.unsqueeze(0) if with_h0 else None
    y_ref, h_ref = _torch_layer(case)(case.x, h0)
    assert rel_err(y, y_ref) < 1e-13
    assert rel_err(y[-1], h_ref[0]) < 1e-13
    assert ws.shape == (T, B, 4 * H)


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_scratch_gru_matches_vectorised_reset_before(T, B, I, H, bias, gen):
    case = make_layer_case(T, B, I, H, reset_after=False, bias=bias, generator=gen)
    params = reference.scratch_params_from_torch(case.w_ih, case.w_hh, case.b_ih, case.b_hh)
    outputs, (h_T,) = reference.gru_scratch(case.x, (case.h0,), params)
    y, _ = reference.gru_layer_forward(case.x, case.h0, case.w_ih, case.w_hh, case.b_ih,
                                       case.b_hh, reset_after=False)
    assert rel_err(y, outputs) < 1e-13
    assert rel_err(y[-1], h_T) < 1e-13
    # Timestep iterables work as in the textbook, and the two formulations really differ.
    outputs2, _ = reference.gru_scratch(list(case.x.unbind(0)), reference.init_gru_state(
        B, H, dtype=torch.float64), params)
    y_zero, _ = reference.gru_layer_forward(case.x, None, case.w_ih, case.w_hh, case.b_ih,
                                            case.b_hh, reset_after=False)
    assert rel_err(outputs2, y_zero) < 1e-13
    y_after, _ = reference.gru_layer_forward(case.x, case.h0, case.w_ih, case.w_hh, case.b_ih,
                                             case.b_hh, reset_after=True)
    if H > 1 or bias:  # with H = 1 and no bias, r * (w h) == w (r * h): the forms agree
        assert rel_err(y_after, y) > 1e-6


@pytest.mark.parametrize("T,B,I,H", SHAPES)
@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("with_h0", [True, False])
def test_hand_written_backward_matches_autograd(T, B, I, H, reset_after, with_h0, gen):
    case = make_layer_case(T, B, I, H, reset_after=reset_after, with_h0=with_h0, generator=gen)
    leaves = [t.clone().requires_grad_() if t is not None else None
              for t in (case.x, case.h0, case.w_ih, case.w_hh, case.b_ih, case.b_hh)]
    y, ws = reference.gru_layer_forward(*leaves, reset_after=reset_after)
    (y * case.grad_y).sum().backward()
    with torch.no_grad():
        grads = reference.gru_layer_backward(case.grad_y, case.x, case.h0, case.w_ih, case.w_hh,
                                             y.detach(), ws.detach(), reset_after=reset_after)
    names = ["dx", "dh0", "dw_ih", "dw_hh", "db_ih", "db_hh"]
    order = [0, 1, 2, 3, 4, 5]
    for name, k, got in zip(names, order, grads):
        if leaves[k] is None:
            continue
        assert rel_err(got, leaves[k].grad) < 1e-12, name


def test_scratch_params_layout():
    """The textbook's matrices are nn.GRU's gate blocks transposed; biases merge."""
    H, I = 4, 3
    w_ih = torch.arange(3 * H * I, dtype=torch.float64).view(3 * H, I)
    w_hh = torch.arange(3 * H * H, dtype=torch.float64).view(3 * H, H) + 1000
    b_ih = torch.arange(3 * H, dtype=torch.float64)
    b_hh = torch.arange(3 * H, dtype=torch.float64) * 10
    W_xz, W_hz, b_z, W_xr, W_hr, b_r, W_xh, W_hh, b_h = reference.scratch_params_from_torch(
        w_ih, w_hh, b_ih, b_hh)
    assert torch.equal(W_xr, w_ih[:H].T) and torch.equal(W_xz, w_ih[H:2 * H].T)
    assert torch.equal(W_xh, w_ih[2 * H:].T) and torch.equal(W_hh, w_hh[2 * H:].T)
    assert torch.equal(W_hr, w_hh[:H].T) and torch.equal(W_hz, w_hh[H:2 * H].T)
    assert torch.equal(b_r, (b_ih + b_hh)[:H]) and torch.equal(b_z, (b_ih + b_hh)[H:2 * H])
    assert torch.equal(b_h, (b_ih + b_hh)[2 * H:])
