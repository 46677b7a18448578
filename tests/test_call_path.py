"""The lean call path: FusedGRU / FusedGRUCell check their weights once and keep the result
while the parameters stay the same objects (dtype and device included).  Whatever changes
the weights a call sees must be seen: new Parameter objects, .to(), functional_call,
torch.nn.utils.parametrize, load_state_dict, in-place optimizer steps."""

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from fusedgru import FusedGRU, FusedGRUCell
from fusedgru.testing import OpLog

F64 = torch.float64


def _pair(**kwargs):
    torch.manual_seed(0)
    t = nn.GRU(3, 4, num_layers=2, dtype=F64, **kwargs)
    f = FusedGRU(3, 4, num_layers=2, dtype=F64, **kwargs)
    f.load_state_dict(t.state_dict())
    return t, f


def test_in_place_updates_and_load_state_dict_are_seen(gen):
    t, f = _pair()
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    torch.testing.assert_close(f(x)[0], t(x)[0])
    with torch.no_grad():  # what an optimizer step does
        for p, q in zip(t.parameters(), f.parameters()):
            p.mul_(1.5)
            q.mul_(1.5)
    torch.testing.assert_close(f(x)[0], t(x)[0])
    t2 = nn.GRU(3, 4, num_layers=2, dtype=F64)
    f.load_state_dict(t2.state_dict())
    torch.testing.assert_close(f(x)[0], t2(x)[0])


def test_new_parameter_objects_and_dtype_changes_are_seen(gen):
    t, f = _pair()
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    f(x)
    f.weight_hh_l1 = nn.Parameter(torch.randn(12, 4, dtype=F64, generator=gen))
    t.weight_hh_l1 = nn.Parameter(f.weight_hh_l1.detach().clone())
    torch.testing.assert_close(f(x)[0], t(x)[0])
    f.float()
    with pytest.raises(TypeError, match="input: expected dtype torch.float32"):
        f(x)
    torch.testing.assert_close(f(x.float())[0], t.float()(x.float())[0], rtol=1e-5, atol=1e-6)
    f.weight_ih_l1 = nn.Parameter(torch.randn(12, 5))  # a wrong shape, newly assigned
    with pytest.raises(ValueError, match=r"weight_ih_l1: expected shape \(12, 4\), got \(12, 5\)"):
        f(x.float())


def test_functional_call_uses_the_tensors_it_is_given(gen):
    t, f = _pair()
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    f(x)  # fills the cache with the module's own parameters
    other = {n: torch.randn_like(p) * 0.3 for n, p in f.named_parameters()}
    torch.testing.assert_close(functional_call(f, other, (x,))[0],
                               functional_call(t, other, (x,))[0])
    cell, tcell = FusedGRUCell(3, 4, dtype=F64), nn.GRUCell(3, 4, dtype=F64)
    xc = torch.randn(2, 3, dtype=F64, generator=gen)
    cell(xc)
    other = {n: torch.randn_like(p) for n, p in cell.named_parameters()}
    torch.testing.assert_close(functional_call(cell, other, (xc,)), functional_call(tcell, other, (xc,)))


class Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


def test_parametrized_weights_are_read_every_call(gen):
    t, f = _pair()
    for m in (t, f):
        parametrize.register_parametrization(m, "weight_hh_l0", Scale())
    x = torch.randn(5, 2, 3, dtype=F64, generator=gen)
    torch.testing.assert_close(f(x)[0], t(x)[0])
    with torch.no_grad():
        for m in (t, f):
            m.parametrizations.weight_hh_l0.original.add_(0.25)
    torch.testing.assert_close(f(x)[0], t(x)[0])
    cell = FusedGRUCell(3, 4, dtype=F64)
    tcell = nn.GRUCell(3, 4, dtype=F64)
    tcell.load_state_dict(cell.state_dict())
    for m in (cell, tcell):
        parametrize.register_parametrization(m, "weight_ih", Scale())
    xc = torch.randn(2, 3, dtype=F64, generator=gen)
    torch.testing.assert_close(cell(xc), tcell(xc))


def test_a_weight_reshaped_through_data_is_refused_by_the_kernel(gen):
    # .data swaps the storage under the same Parameter object: the cached check cannot see
    # it, the kernel's own shape check does (a RuntimeError, never a read out of bounds).
    f = FusedGRU(3, 4, dtype=torch.float32, backend="auto")
    x = torch.randn(5, 2, 3, generator=gen)
    f(x)
    f.weight_hh_l0.data = torch.randn(12, 5)
    with pytest.raises(RuntimeError, match="weight|w_hh|shape"):
        f(x)


# ----------------------------------------------------------------------------------------
# FusedGRUCell's lean call: one registered op per call
# ----------------------------------------------------------------------------------------


def _cell_pair(dtype=torch.float32):
    torch.manual_seed(0)
    t = nn.GRUCell(5, 7, dtype=dtype)
    return t, FusedGRUCell.from_torch(t, backend="cpu")


def _ops_of(fn):
    with OpLog() as log:
        out = fn()
    return out, log.names


@pytest.fixture
def cpu_cell():
    from fusedgru import backends

    if "cpu" not in backends.available_backends():
        pytest.skip("the lean cell call serves the cpu backend, not built here")
    return _cell_pair()


def test_lean_cell_call_is_one_op_and_equal(cpu_cell, gen):
    """After a first call, an inference call is the one fusedgru::gru_cell_infer (no other
    op runs: no unsqueeze/contiguous/index of its own), bitwise the general path's result."""
    t, f = cpu_cell
    x = torch.randn(3, 5, generator=gen)
    h = torch.randn(3, 7, generator=gen)
    with torch.no_grad():
        general = f(x, h)  # the first call takes the general path and plans
        assert f.__dict__.get("_lean") is not None
        lean, names = _ops_of(lambda: f(x, h))
        assert names == ["fusedgru.gru_cell_infer.default"]
        assert torch.equal(lean, general)
        torch.testing.assert_close(lean, t(x, h))
        torch.testing.assert_close(f(x), t(x))  # hx absent


def test_lean_cell_call_steps_aside(cpu_cell, gen):
    """What the lean call does not handle takes the general path: a gradient to compute,
    bad input (nn.GRUCell's exception classes), new weights, another dtype, a changed
    formulation."""
    t, f = cpu_cell
    x = torch.randn(2, 5, generator=gen)
    with torch.no_grad():
        f(x)
    # grad mode with parameters that require grad: differentiable, gradients match
    y = f(x)
    y.sum().backward()
    t(x).sum().backward()
    torch.testing.assert_close(f.weight_hh.grad, t.weight_hh.grad)
    with torch.no_grad():
        for bad, cls in ((torch.randn(2, 4), (ValueError, RuntimeError)),
                         (torch.randn(2, 5, dtype=F64), RuntimeError),
                         (torch.randn(2, 5).int(), RuntimeError)):
            with pytest.raises(cls):
                t(bad)
            with pytest.raises(cls):
                f(bad)
        with pytest.raises((ValueError, RuntimeError)):
            f(x, torch.randn(3, 7))
        # new Parameter objects
        f.weight_hh = nn.Parameter(f.weight_hh * 2)
        t.weight_hh = nn.Parameter(t.weight_hh * 2)
        torch.testing.assert_close(f(x), t(x))
        torch.testing.assert_close(f(x), t(x))
        # .double() keeps the Parameter objects, changes their dtype
        f.double(), t.double()
        torch.testing.assert_close(f(x.double()), t(x.double()))
        # another formulation: the plan is not reused
        before = f(x.double())
        f.reset_after = False
        assert not torch.equal(f(x.double()), before)


def test_lean_cell_call_under_autocast_and_func(cpu_cell, gen, monkeypatch):
    """Under autocast or a torch.func transform the general path runs (it casts, or it
    differentiates through the transform)."""
    from fusedgru import functional

    t, f = cpu_cell
    x = torch.randn(2, 5, generator=gen)
    calls = []
    general = functional.gru_cell

    def counting(*a, **k):
        calls.append(1)
        return general(*a, **k)

    monkeypatch.setattr(functional, "gru_cell", counting)
    with torch.no_grad():
        f(x)
        f(x)
        assert len(calls) == 1  # planned by the first, lean afterwards
        with torch.autocast("cpu", dtype=torch.bfloat16):
            f(x)
        assert len(calls) == 2
    jac = torch.func.jacrev(lambda inp: f(inp))(x)
    jac_t = torch.func.jacrev(lambda inp: t(inp))(x)
    torch.testing.assert_close(jac, jac_t)
    assert len(calls) >= 3


def test_lean_call_reads_a_setting_a_subclass_computes(gen):
    """The lean plan reads the module's settings from its instance dict, and through
    getattr where a subclass computes one (a property): a FusedGRU subclass whose
    batch_first is a property gets nn.GRU's batch-first results from the lean call, and
    after the property changes, nn.GRU's time-first ones."""
    from fusedgru import backends

    if "cpu" not in backends.available_backends():
        pytest.skip("the lean call serves the cpu backend, not built here")

    class Computed(FusedGRU):
        @property
        def batch_first(self):
            return self.__dict__["_layout"] == "BTC"

        @batch_first.setter
        def batch_first(self, value):
            self.__dict__["_layout"] = "BTC" if value else "TBC"

    torch.manual_seed(0)
    t = nn.GRU(5, 7, batch_first=True)
    f = Computed(5, 7, batch_first=True, backend="cpu")
    f.load_state_dict(t.state_dict())
    assert "batch_first" not in f.__dict__
    x = torch.randn(3, 4, 5, generator=gen)
    with torch.no_grad():
        for batch_first in (True, False):
            f.batch_first = t.batch_first = batch_first
            f(x)
            lean = f.__dict__["_lean"]
            assert lean[2] is not None and lean[1][2] is batch_first  # planned, and served
            got, names = _ops_of(lambda: f(x))
            assert [n for n in names if "fusedgru" in n] == ["fusedgru.gru_infer.default"]
            for a, b in zip(got, t(x)):
                torch.testing.assert_close(a, b)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_lean_gru_call_is_one_op_and_equal(batch_first, bias, gen):
    """FusedGRU of one layer and direction: an inference call (T=1 or more) runs the one
    fusedgru::gru_infer, with nn.GRU's results; what it does not handle takes the general
    path (resets, two layers, a gradient)."""
    from fusedgru import backends

    if "cpu" not in backends.available_backends():
        pytest.skip("the lean call serves the cpu backend, not built here")
    torch.manual_seed(0)
    t = nn.GRU(5, 7, bias=bias, batch_first=batch_first)
    f = FusedGRU.from_torch(t, backend="cpu")
    for T in (1, 4):
        x = torch.randn(3, T, 5, generator=gen) if batch_first else torch.randn(T, 3, 5,
                                                                               generator=gen)
        h = torch.randn(1, 3, 7, generator=gen)
        with torch.no_grad():
            want = t(x, h)
            f(x, h)
            got, names = _ops_of(lambda: f(x, h))
            assert [n for n in names if "fusedgru" in n] == ["fusedgru.gru_infer.default"]
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b)
            torch.testing.assert_close(f(x)[0], t(x)[0])
            resets = torch.zeros(x.shape[:2], dtype=torch.bool)
            if batch_first:
                resets[:, 0] = True
            else:
                resets[0] = True
            torch.testing.assert_close(f(x, h, resets=resets)[0], t(x)[0])  # hx never enters
            with pytest.raises((ValueError, RuntimeError)):
                f(x, torch.randn(2, 3, 7))
    y, h_n = f(x)
    (y.sum() + h_n.sum()).backward()
    assert f.weight_hh_l0.grad is not None


# ----------------------------------------------------------------------------------------
# The lean call with a gradient: fusedgru::gru_fwd / gru_bwd below autograd (_LeanTrain)
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", ["cell", "gru", "gru-bf"])
@pytest.mark.parametrize("bias,with_h", [(True, True), (False, False), (True, False)],
                         ids=["bias-h", "bare", "noh"])
@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_lean_training_call_is_one_op_pair_and_bitwise_the_general_path(kind, bias, with_h,
                                                                         reset_after, dtype,
                                                                         gen):
    """With a gradient to compute, a planned module's call runs fusedgru::gru_fwd and its
    backward gru_bwd, and nothing else of fusedgru's (no Python autograd wrapper between).
    The output and every gradient are bitwise those of the general path (the functional
    API, which never takes the lean call)."""
    from fusedgru import backends, functional

    if "cpu" not in backends.available_backends():
        pytest.skip("the lean call serves the cpu backend, not built here")
    bf = kind == "gru-bf"
    torch.manual_seed(0)
    if kind == "cell":
        m = FusedGRUCell(5, 7, bias=bias, dtype=dtype, reset_after=reset_after, backend="cpu")
        x = torch.randn(3, 5, generator=gen, dtype=dtype)
        h = torch.randn(3, 7, generator=gen, dtype=dtype) if with_h else None
    else:
        m = FusedGRU(5, 7, bias=bias, batch_first=bf, dtype=dtype, reset_after=reset_after,
                     backend="cpu")
        x = torch.randn(*((3, 4) if bf else (4, 3)), 5, generator=gen, dtype=dtype)
        h = torch.randn(1, 3, 7, generator=gen, dtype=dtype) if with_h else None
    with torch.no_grad():
        m(x, h)  # plans
    assert m.__dict__["_lean"][2] is not None

    def general(xx, hh):
        w = list(m.parameters())
        if kind == "cell":
            return functional.gru_cell(xx, hh, *w, reset_after=reset_after, backend="cpu")
        return functional.gru(xx, w, hh, batch_first=bf, reset_after=reset_after,
                              backend="cpu")

    def run(fn):
        for p in m.parameters():
            p.grad = None
        xx = x.clone().requires_grad_()
        hh = h.clone().requires_grad_() if h is not None else None
        with OpLog() as log:
            out = fn(xx, hh)
            y, hn = (out, out) if kind == "cell" else out
            (y.square().sum() + 2 * hn.sum()).backward()
        grads = [xx.grad] + ([hh.grad] if hh is not None else [])
        grads += [p.grad for p in m.parameters()]
        return y, grads, [n for n in log.names if "fusedgru" in n]

    y_g, grads_g, names_g = run(general)
    y_l, grads_l, names_l = run(m)
    assert names_l == ["fusedgru.gru_fwd.default", "fusedgru.gru_bwd.default"], names_l
    assert names_g == names_l  # the same kernels, reached through the registered formula
    assert torch.equal(y_l, y_g)
    for a, b in zip(grads_l, grads_g):
        assert a is not None and torch.equal(a, b)


def _graph_has(t, node_name: str, depth: int = 3) -> bool:
    """Whether an autograd node named node_name is within depth steps of t.grad_fn."""
    todo = [(t.grad_fn, 0)]
    while todo:
        node, d = todo.pop()
        if node is None or d > depth:
            continue
        if type(node).__name__ == node_name:
            return True
        todo.extend((n, d + 1) for n, _ in node.next_functions)
    return False


@pytest.mark.parametrize("kind", ["cell", "gru"])
@pytest.mark.parametrize("frozen", ["input", "weights"])
def test_lean_training_call_computes_only_what_is_needed(kind, frozen, gen):
    """The lean call asks gru_bwd for dx only when the input needs a gradient and for the
    weight gradients only when the parameters do (as nn.GRUCell's backward); what it
    returns is bitwise the general path's, which asks the same."""
    from fusedgru import backends, functional

    if "cpu" not in backends.available_backends():
        pytest.skip("the lean call serves the cpu backend, not built here")
    if kind == "cell":
        m = FusedGRUCell(5, 7, backend="cpu")
        x = torch.randn(3, 5, generator=gen)
        h = torch.randn(3, 7, generator=gen)
    else:
        m = FusedGRU(5, 7, backend="cpu")
        x = torch.randn(4, 3, 5, generator=gen)
        h = torch.randn(1, 3, 7, generator=gen)
    with torch.no_grad():
        m(x, h)  # plans
    assert m.__dict__["_lean"][2] is not None
    for p in m.parameters():
        p.requires_grad_(frozen == "input")

    def general(xx, hh):
        w = list(m.parameters())
        if kind == "cell":
            return functional.gru_cell(xx, hh, *w, backend="cpu")
        return functional.gru(xx, w, hh, backend="cpu")

    def run(fn):
        xx = x.clone().requires_grad_(frozen == "weights")
        hh = h.clone().requires_grad_()
        wanted = [t for t in [xx, hh, *m.parameters()] if t.requires_grad]
        with OpLog() as log:
            out = fn(xx, hh)
            y = out if kind == "cell" else out[0]
            lean = _graph_has(y, "_LeanTrainBackward")
            grads = torch.autograd.grad(y.square().sum(), wanted)
        return grads, log.backward_needs("fusedgru.gru_bwd.default"), lean

    grads_g, needs_g, lean_g = run(general)
    grads_l, needs_l, lean_l = run(m)
    assert lean_l and not lean_g  # the module took the lean call, the functional API not
    assert needs_l == needs_g == [(frozen == "weights", frozen == "input")]
    for a, b in zip(grads_l, grads_g):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reset_after", [True, False], ids=["after", "before"])
def test_lean_training_call_gradcheck_and_double_backward(reset_after, gen):
    """float64 gradcheck and gradgradcheck through the lean call of a planned cell and GRU
    (inputs and states); the double backward (create_graph) differentiates the general op's
    formulas: the weights' second derivative equals the reference's."""
    from fusedgru import backends, reference

    if "cpu" not in backends.available_backends():
        pytest.skip("the lean call serves the cpu backend, not built here")
    torch.manual_seed(0)
    cell = FusedGRUCell(3, 4, dtype=F64, reset_after=reset_after, backend="cpu")
    gru = FusedGRU(3, 4, dtype=F64, reset_after=reset_after, backend="cpu")
    x = torch.randn(2, 3, dtype=F64, generator=gen, requires_grad=True)
    h = torch.randn(2, 4, dtype=F64, generator=gen, requires_grad=True)
    xs = torch.randn(3, 2, 3, dtype=F64, generator=gen, requires_grad=True)
    with torch.no_grad():
        cell(x, h), gru(xs, h[None])
    assert cell.__dict__["_lean"][2] is not None and gru.__dict__["_lean"][2] is not None
    with OpLog() as log:
        assert torch.autograd.gradcheck(lambda x, h: cell(x, h), (x, h))
        assert torch.autograd.gradgradcheck(lambda x, h: cell(x, h), (x, h))
        assert torch.autograd.gradcheck(lambda x, h: gru(x, h[None])[0], (xs, h))
        assert torch.autograd.gradgradcheck(lambda x, h: gru(x, h[None])[1], (xs, h))
    assert "fusedgru.gru_fwd.default" in log.names
    w_ih, w_hh, b_ih, b_hh = cell.parameters()
    (g,) = torch.autograd.grad(cell(x, h).square().sum(), w_hh, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), w_hh)
    w_ref = w_hh.detach().clone().requires_grad_()
    y_ref = reference.gru_layer_forward(x[None], h, w_ih, w_ref, b_ih, b_hh, reset_after)[0][0]
    (g_ref,) = torch.autograd.grad(y_ref.square().sum(), w_ref, create_graph=True)
    (gg_ref,) = torch.autograd.grad(g_ref.square().sum(), w_ref)
    torch.testing.assert_close(g, g_ref)
    torch.testing.assert_close(gg, gg_ref)


def test_lean_training_call_sees_in_place_weight_updates(gen):
    """A weight changed in place between the forward and the backward is refused, as
    autograd refuses it on the general path (saved tensors' version counters)."""
    from fusedgru import backends

    if "cpu" not in backends.available_backends():
        pytest.skip("the lean call serves the cpu backend, not built here")
    cell = FusedGRUCell(3, 4, backend="cpu")
    x = torch.randn(2, 3, generator=gen)
    with torch.no_grad():
        cell(x)
    y = cell(x)
    with torch.no_grad():
        cell.weight_hh.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("kind", ["cell", "gru"])
def test_a_module_pickles_and_deep_copies_after_lean_calls(kind, gen, tmp_path):
    """torch.save(module) / pickle / copy.deepcopy work after calls that made a lean plan
    (it held op handles that do not pickle: torch.save raised), and the copy computes what
    the original does."""
    import copy
    import pickle

    m = FusedGRUCell(3, 4) if kind == "cell" else FusedGRU(3, 4)
    x = torch.randn(2, 3, generator=gen) if kind == "cell" else torch.randn(5, 2, 3, generator=gen)
    out = lambda mod: mod(x) if kind == "cell" else mod(x)[0]
    out(m).sum().backward()
    with torch.no_grad():
        want = out(m)
    path = tmp_path / "m.pt"
    torch.save(m, path)
    copies = [torch.load(path, weights_only=False), pickle.loads(pickle.dumps(m)),
              copy.deepcopy(m)]
    for c in copies:
        with torch.no_grad():
            assert torch.equal(out(c), want)
        out(c).sum().backward()  # trains too, through the plan it makes again
        assert c.weight_hh.grad is not None if kind == "cell" else c.weight_hh_l0.grad is not None
