"""The weight gradients of lean training calls (fusedgru/modules.py, _grad_token): every call
of a backward pass adds its weight gradients into one buffer per weight (fusedgru::
gru_bwd_acc), which reaches the weight once, through a token only these calls consume.
Whatever else autograd does with the weights must see the same gradients as with
nn.GRUCell: other uses of the weight in the graph, several or overlapping backward passes
(retain_graph, autograd.grad of part of the graph, threads, reentrant checkpoints), hooks,
optimizer steps between iterations, .grad accumulated over passes, double backward."""

import gc
import threading

import pytest
import torch
from torch import nn

from fusedgru import FusedGRU, FusedGRUCell, backends
from fusedgru import modules as M
from fusedgru.testing import OpLog

F64 = torch.float64


@pytest.fixture(autouse=True)
def _cpu_backend():
    if "cpu" not in backends.available_backends():
        pytest.skip("the lean call serves the cpu backend, not built here")
    assert M._LEAN_ACCUMULATE[0]  # the default


def _cells(B_in=5, H=7, bias=True, reset_after=True, dtype=F64):
    torch.manual_seed(0)
    f = FusedGRUCell(B_in, H, bias=bias, reset_after=reset_after, dtype=dtype, backend="cpu")
    t = None
    if reset_after:
        t = nn.GRUCell(B_in, H, bias=bias, dtype=dtype)
        t.load_state_dict(f.state_dict())
    return f, t


def _loop(m, xs, h):
    hs = []
    for x in xs:
        h = m(x, h)
        hs.append(h)
    return hs


def _loss(hs):
    return sum((k + 1) * h.square().sum() for k, h in enumerate(hs))


def _grads(m, xs, h0, extra=None):
    """Gradients of a weighted loss over a step loop: (inputs', parameters')."""
    _no_grads(m)
    xs = [x.detach().clone().requires_grad_() for x in xs]
    loss = _loss(_loop(m, xs, h0))
    if extra is not None:
        loss = loss + extra(m)
    loss.backward()
    return [x.grad for x in xs] + [p.grad for p in m.parameters()]


def _inputs(B, I, H, T=6, dtype=F64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, I, generator=g, dtype=dtype) for _ in range(T)], \
        torch.randn(B, H, generator=g, dtype=dtype)


def _no_grads(m):
    for p in m.parameters():
        p.grad = None


def _planned(B, T=6):
    """The cell pair (H=7), a loop's inputs, and the fused cell's lean plan made (one
    call)."""
    f, t = _cells()
    xs, h0 = _inputs(B, 5, 7, T=T)
    f(xs[0], h0)
    return f, t, xs, h0


def _assert_all_close(a, b, **kw):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **kw)


@pytest.mark.parametrize("B", [1, 3, 9, 40], ids=lambda b: f"B{b}")  # 9, 40: GEMM's path
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "bare"])
def test_a_step_loop_adds_into_one_buffer_and_matches_nn_grucell(B, bias):
    """One gru_bwd for the pass's first step, gru_bwd_acc for the others; the gradients are
    nn.GRUCell's, and bitwise those of returning them per step (the switch off) when nothing
    else uses the weights (the same sums in the same order)."""
    f, t = _cells(bias=bias)
    xs, h0 = _inputs(B, 5, 7)
    f(xs[0], h0)  # plans
    with OpLog() as log:
        got = _grads(f, xs, h0)
    names = [n for n in log.names if n.startswith("fusedgru")]
    assert names.count("fusedgru.gru_bwd.default") == 1, names
    assert names.count("fusedgru.gru_bwd_acc.default") == len(xs) - 1, names
    _assert_all_close(got, _grads(t, xs, h0))
    old = M._set_lean_accumulate(False)
    try:
        per_step = _grads(f, xs, h0)
    finally:
        M._set_lean_accumulate(old)
    for a, b in zip(got, per_step):
        if B <= 8:  # small_outer: out + sum, as autograd's add_
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b)


def test_reset_before_and_h0_absent_match_the_general_path():
    """reset_after=False (rows n of dW_hh multiply r * h) and a loop whose first step has no
    hx: the same gradients as the functional API, which never takes the lean call."""
    from fusedgru import functional

    f, _ = _cells(reset_after=False)
    xs, _ = _inputs(3, 5, 7)
    f(xs[0])

    def general(x, h):
        return functional.gru_cell(x, h, *f.parameters(), reset_after=False, backend="cpu")

    def run(step):
        _no_grads(f)
        xx = [x.clone().requires_grad_() for x in xs]
        h, hs = None, []
        for x in xx:
            h = step(x, h)
            hs.append(h)
        _loss(hs).backward()
        return [x.grad for x in xx] + [p.grad for p in f.parameters()]

    with OpLog() as log:
        got = run(f)
    assert "fusedgru.gru_bwd_acc.default" in log.names
    _assert_all_close(got, run(general))


def test_other_uses_of_the_weights_in_the_same_graph():
    """A regularizer on both weights and a tied use of weight_hh outside the cell: their
    gradients reach the same .grad as the steps' (which arrive once, summed), and nothing
    is lost whatever order autograd runs them in."""
    f, t, xs, h0 = _planned(2, T=8)
    v = torch.randn(3, 7, dtype=F64)

    def extra(m):
        tied = torch.nn.functional.linear(v, m.weight_hh)  # (3, 21): weight_hh used again
        return 0.1 * (m.weight_ih ** 2).sum() + tied.square().sum()

    _assert_all_close(_grads(f, xs, h0, extra), _grads(t, xs, h0, extra))


def test_two_modules_sharing_weights_and_two_sequences_in_one_graph():
    """Two cells holding the same Parameter objects (each its own token) and one cell run
    over two sequences in one graph: every contribution is counted once."""
    f, t = _cells()
    g = FusedGRUCell.from_torch(t, backend="cpu", share=False)
    g.weight_ih, g.weight_hh = f.weight_ih, f.weight_hh
    t2 = nn.GRUCell(5, 7, dtype=F64)
    t2.load_state_dict(g.state_dict())
    t2.weight_ih, t2.weight_hh = t.weight_ih, t.weight_hh
    xs, h0 = _inputs(2, 5, 7)
    ys, _ = _inputs(2, 5, 7, seed=5)
    f(xs[0], h0), g(xs[0], h0)

    def run(a, b):
        for p in list(a.parameters()) + list(b.parameters()):
            p.grad = None
        loss = _loss(_loop(a, xs, h0)) + _loss(_loop(b, ys, h0)) + _loss(_loop(a, ys[:3], h0))
        loss.backward()
        return [p.grad for p in a.parameters()] + [b.bias_ih.grad, b.bias_hh.grad]

    _assert_all_close(run(f, g), run(t, t2))


def test_retain_graph_partial_passes_and_grad_accumulation_over_passes():
    """A full pass then a pass from a middle step over the same graph (retain_graph),
    accumulating into .grad across both, then autograd.grad of an input only (no weight
    gradient: that pass's buffer is dropped, not kept), then a last pass; afterwards
    fusedgru holds no buffer of any pass (weak references only)."""
    f, t, xs, h0 = _planned(3)

    def run(m):
        _no_grads(m)
        xx = [x.clone().requires_grad_() for x in xs]
        hs = _loop(m, xx, h0)
        _loss(hs).backward(retain_graph=True)
        first = [p.grad.clone() for p in m.parameters()]
        hs[3].sum().backward(retain_graph=True)
        (gx,) = torch.autograd.grad(hs[-1].sum(), [xx[1]], retain_graph=True)
        hs[-1].sum().backward()
        return first + [p.grad for p in m.parameters()] + [gx]

    _assert_all_close(run(f), run(t))
    for p in f.parameters():
        p.grad = None  # .grad may be a pass's buffer itself (autograd steals it)
    gc.collect()
    recs = f.__dict__["_lean"][2][6]
    assert all(rec is not None for rec in recs)
    assert all(len(rec[1]) == 0 for rec in recs)  # fusedgru keeps no pass's buffer alive


def test_optimizer_steps_over_iterations():
    """Iterations of forward, backward, SGD step (in place under no_grad) and zero_grad:
    the weights stay equal to nn.GRUCell's trained the same way."""
    f, t = _cells()
    opt_f = torch.optim.SGD(f.parameters(), lr=0.05, momentum=0.9)
    opt_t = torch.optim.SGD(t.parameters(), lr=0.05, momentum=0.9)
    for it in range(4):
        xs, h0 = _inputs(2, 5, 7, seed=10 + it)
        for m, opt in ((f, opt_f), (t, opt_t)):
            opt.zero_grad()
            _loss(_loop(m, xs, h0)).backward()
            opt.step()
    _assert_all_close(list(f.parameters()), list(t.parameters()))


def test_hooks_on_the_weights_fire_once_per_pass_with_the_sum():
    """A tensor hook and a post-accumulate-grad hook on weight_hh fire once per backward
    pass, as with nn.GRUCell, and see the summed gradient."""
    f, t, xs, h0 = _planned(2)
    seen = {}
    for name, m in (("f", f), ("t", t)):
        seen[name] = []
        m.weight_hh.register_hook(lambda g, n=name: seen[n].append(g.clone()))
        m.weight_hh.register_post_accumulate_grad_hook(
            lambda p, n=name: seen[n].append(p.grad.clone()))
        _grads(m, xs, h0)
    assert len(seen["f"]) == len(seen["t"]) == 2
    _assert_all_close(seen["f"], seen["t"])


def test_concurrent_backward_passes_in_threads():
    """Threads running loops of the same cell and autograd.grad of the weights at the same
    time: each pass has its own buffer (keyed by graph task)."""
    f, t = _cells(H=16)
    f(torch.randn(2, 5, dtype=F64), None)
    out, errors = {}, []

    def work(k):
        try:
            xs, h0 = _inputs(2, 5, 16, T=30, seed=20 + k)
            for rep in range(3):
                hs = _loop(f, xs, h0)
                out[k] = torch.autograd.grad(_loss(hs), [f.weight_ih, f.weight_hh])
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for k in range(4):
        xs, h0 = _inputs(2, 5, 16, T=30, seed=20 + k)
        want = torch.autograd.grad(_loss(_loop(t, xs, h0)), [t.weight_ih, t.weight_hh])
        _assert_all_close(out[k], want)


def test_reentrant_checkpoint_inside_the_loop():
    """torch.utils.checkpoint (reentrant: a nested backward pass on the same thread) around
    part of the loop: the outer pass's buffer survives the inner pass."""
    from torch.utils.checkpoint import checkpoint

    f, t, xs, h0 = _planned(2)

    def run(m):
        _no_grads(m)
        h = m(xs[0], h0)
        h = checkpoint(lambda h: m(xs[2], m(xs[1], h)), h, use_reentrant=True)
        h = m(xs[3], h)
        (h.square().sum()).backward()
        return [p.grad for p in m.parameters()]

    _assert_all_close(run(f), run(t))


def test_a_frozen_weight_and_a_frozen_input():
    """weight_ih frozen (no token: only weight_hh's gradient goes through one) and inputs
    that need no gradient: the gradients nn.GRUCell computes."""
    f, t = _cells()
    for m in (f, t):
        m.weight_ih.requires_grad_(False)
    xs, h0 = _inputs(3, 5, 7)
    f(xs[0], h0)
    for m in (f, t):
        _no_grads(m)
        _loss(_loop(m, xs, h0)).backward()
    assert f.weight_ih.grad is None and t.weight_ih.grad is None
    _assert_all_close([p.grad for p in f.parameters() if p.requires_grad],
                      [p.grad for p in t.parameters() if p.requires_grad])


def test_finite_differences_of_the_weights_through_a_loop():
    """The weights' gradient of a 5-step loop (float64) against central differences of the
    loss in a few entries of each weight and bias, perturbed in place."""
    f, _ = _cells(H=6)
    xs, h0 = _inputs(2, 5, 6, T=5)
    f(xs[0], h0)
    grads = _grads(f, xs, h0)[len(xs):]
    g = torch.Generator().manual_seed(3)
    eps = 1e-6
    for p, gp in zip(f.parameters(), grads):
        flat, gflat = p.data.view(-1), gp.view(-1)
        for i in torch.randint(0, flat.numel(), (4,), generator=g).tolist():
            with torch.no_grad():
                old = flat[i].item()
                flat[i] = old + eps
                up = _loss(_loop(f, xs, h0)).item()
                flat[i] = old - eps
                down = _loss(_loop(f, xs, h0)).item()
                flat[i] = old
            assert abs((up - down) / (2 * eps) - gflat[i].item()) < 1e-6 * max(1, abs(up))


def test_double_backward_through_a_loop():
    """create_graph over a loop: the calls return differentiable weight gradients directly
    (no shared buffer), and the second derivative is nn.GRUCell's."""
    f, t = _cells(H=4)
    xs, h0 = _inputs(2, 5, 4, T=3)
    f(xs[0], h0)
    out = []
    for m in (f, t):
        (g,) = torch.autograd.grad(_loss(_loop(m, xs, h0)), m.weight_hh, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum(), m.weight_hh)
        out.append((g, gg))
    _assert_all_close(out[0], out[1])


def test_t1_calls_of_a_gru_share_the_buffer_too():
    """A streaming FusedGRU called with T=1 per step (its lean call) adds into one buffer
    per weight as the cell does; gradients equal nn.GRU's."""
    torch.manual_seed(0)
    t = nn.GRU(5, 7, dtype=F64)
    f = FusedGRU.from_torch(t, backend="cpu")
    xs, h0 = _inputs(3, 5, 7)
    f(xs[0][None], h0[None])

    def run(m):
        _no_grads(m)
        h, loss = h0[None], 0
        for x in xs:
            y, h = m(x[None], h)
            loss = loss + y.square().sum()
        loss.backward()
        return [p.grad for p in m.parameters()]

    with OpLog() as log:
        got = run(f)
    assert log.names.count("fusedgru.gru_bwd_acc.default") == len(xs) - 1
    _assert_all_close(got, run(t))
    with OpLog() as log:  # T > 1: one call per pass is the usual case; gradients returned
        y, _ = f(torch.stack(xs), h0[None])
        y.sum().backward()
    assert "fusedgru.gru_bwd_acc.default" not in log.names


def test_gru_bwd_acc_refuses_a_wrong_buffer():
    """The op names the buffer and what it expected (a wrong shape or dtype would write out
    of bounds or reinterpret memory)."""
    ops = torch.ops.fusedgru
    x, h0 = torch.randn(1, 2, 3), torch.randn(2, 4)
    w, u = torch.randn(12, 3), torch.randn(12, 4)
    y, ws = ops.gru_fwd(x, h0, w, u, None, None, True, None, None)
    gy = torch.randn_like(y)
    for bad, name in ((torch.zeros(12, 4), "dw_ih"), (torch.zeros(12, 3, dtype=F64), "dw_ih"),
                      (torch.zeros(4, 12).t(), "dw_ih")):
        with pytest.raises(RuntimeError, match=f"{name}: expected a contiguous"):
            ops.gru_bwd_acc(gy, x, h0, w, u, y, ws, True, True, True, bad, None)
    with pytest.raises(RuntimeError, match=r"dw_hh: expected a contiguous Float CPU tensor of "
                                           r"shape \(12, 4\)"):
        ops.gru_bwd_acc(gy, x, h0, w, u, y, ws, True, True, True, None, torch.zeros(12, 3))


def test_gru_cell_infer_is_gru_infer_of_one_step():
    """fusedgru::gru_cell_infer (the lean FusedGRUCell inference call's op) gives gru_infer's
    step bitwise, with and without hx and biases, and refuses an input that is not (B, I)."""
    ops = torch.ops.fusedgru
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, F64):
        x, h0 = torch.randn(3, 5, generator=g, dtype=dtype), torch.randn(3, 4, generator=g, dtype=dtype)
        w, u = torch.randn(12, 5, generator=g, dtype=dtype), torch.randn(12, 4, generator=g, dtype=dtype)
        b, c = torch.randn(12, generator=g, dtype=dtype), torch.randn(12, generator=g, dtype=dtype)
        for args in ((h0, w, u, b, c), (None, w, u, None, None)):
            for ra in (True, False):
                want = ops.gru_infer(x[None], *args, ra)[0]
                got = ops.gru_cell_infer(x, *args, ra)
                assert got.shape == (3, 4) and torch.equal(got, want)
    with pytest.raises(RuntimeError, match=r"gru_cell_infer \(cpu\): x: expected a 2-D \(B, I\) "
                                           r"tensor, got 3-D"):
        ops.gru_cell_infer(x[None], h0, w, u, b, c, True)


def test_the_token_is_no_view_of_the_weight_and_survives_optimizer_steps():
    """The usual loop keeps the previous iteration's graph alive (loss still assigned) while
    the next forward runs, so the token is reused across an optimizer step.  It is not a
    view of the weight: its node stays fusedgru's (a view's grad_fn would be remade after
    the in-place step, as an as_strided scatter of the whole gradient), it holds no storage
    of the weight, and the weights still train as nn.GRUCell's."""
    f, t = _cells()
    opt_f = torch.optim.SGD(f.parameters(), lr=0.1)
    opt_t = torch.optim.SGD(t.parameters(), lr=0.1)
    f(torch.randn(2, 5, dtype=F64), None)
    nodes = []
    loss_f = loss_t = None  # kept across iterations, as a training loop keeps them
    for it in range(3):
        xs, h0 = _inputs(2, 5, 7, seed=30 + it)
        for m, opt in ((f, opt_f), (t, opt_t)):
            opt.zero_grad()
            loss = _loss(_loop(m, xs, h0))
            loss.backward()
            opt.step()
            if m is f:
                loss_f = loss
                tok = f.__dict__["_lean"][2][6][1][0]()
                assert tok is not None and tok.untyped_storage().nbytes() == 8  # its own 0-dim
                nodes.append(tok.grad_fn.name())
            else:
                loss_t = loss
    assert loss_f is not None and loss_t is not None
    # fusedgru's node every time, never remade as a view's AsStridedBackward
    assert len(nodes) == 3 and all(n.endswith("GradToken>") for n in nodes), nodes
    _assert_all_close(list(f.parameters()), list(t.parameters()))


def test_converting_the_module_while_a_graph_is_alive():
    """module.float() with swap_module_params_on_conversion (torch.utils.swap_tensors) while
    an earlier graph is still referenced: as with nn.GRUCell, it works (a token viewing the
    weight made swap_tensors refuse: one reference too many)."""
    f, t, xs, h0 = _planned(2)
    old = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        for m in (t, f):
            loss = _loss(_loop(m, xs, h0))
            loss.backward()
            m.float()  # loss (and its graph) still alive
        x32, h32 = [x.float() for x in xs], h0.float()
        _assert_all_close(_loop(f, x32, h32), _loop(t, x32, h32))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(old)


def test_a_dtype_change_makes_a_new_plan():
    """.float() / .double() keep the Parameter objects (their .data changes): the next call
    makes a new plan for the new dtype, and the lean call serves it again (it stayed off)."""
    f, _ = _cells(dtype=torch.float32)
    x = torch.randn(2, 5)
    xd = x.double()
    with torch.no_grad():
        f(x)
        f.double()
        f(xd)  # the general path, which plans again
        assert f.__dict__["_lean"][2][0] is F64
        with OpLog() as log:
            f(xd)
        assert log.names == ["fusedgru.gru_cell_infer.default"]


def test_inference_mode_with_grad_enabled_records_nothing():
    """torch.inference_mode() with torch.enable_grad() inside: nn.GRUCell records no graph
    (inference tensors are not saved), and neither does the lean call: no error, no grad."""
    f, t, xs, h0 = _planned(2)
    with torch.inference_mode(), torch.enable_grad():
        y, want = f(xs[0], h0), t(xs[0], h0)
    assert not y.requires_grad and not want.requires_grad
    torch.testing.assert_close(y, want)
