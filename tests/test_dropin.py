"""Drop-in fidelity, table-driven: every case runs through torch.nn.GRU / nn.GRUCell and
FusedGRU / FusedGRUCell side by side.  Where torch rejects the case, fusedgru must raise an
instance of the class torch raised (so ``except RuntimeError`` around a model keeps
working) with a message that starts with the argument's name; where torch accepts it,
fusedgru must accept it and return the same shapes and values.

Add a row for every new edge found; the tables only grow.
"""

import warnings

import pytest
import torch
from torch import nn

from fusedgru import FusedGRU, FusedGRUCell

r = torch.randn


def _outcome(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(), None
        except Exception as exc:  # noqa: BLE001 - the class is what is compared
            return None, exc


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    return []


def _same_behaviour(torch_fn, fused_fn, argument):
    expected, torch_exc = _outcome(torch_fn)
    got, fused_exc = _outcome(fused_fn)
    if torch_exc is not None:
        assert fused_exc is not None, f"torch raised {torch_exc!r}; fusedgru accepted the case"
        assert isinstance(fused_exc, type(torch_exc)), (
            f"torch raised {type(torch_exc).__name__}, fusedgru {type(fused_exc).__name__} "
            f"({fused_exc}), which is not an instance of it")
        assert str(fused_exc).startswith(argument + ":"), (
            f"the message should name {argument!r}: {fused_exc}")
        return None, None
    assert fused_exc is None, f"torch accepted the case; fusedgru raised {fused_exc!r}"
    return expected, got


def _check_same_outputs(expected, got):
    if isinstance(expected, nn.Module):
        return
    e, g = _flat(expected), _flat(got)
    assert [tuple(t.shape) for t in g] == [tuple(t.shape) for t in e]
    for te, tg in zip(e, g):
        torch.testing.assert_close(tg, te)


# (id, constructor args, constructor kwargs, the argument a rejection must name)
GRU_CONSTRUCTOR_CASES = [
    ("hidden_size=0", (4, 0), {}, "hidden_size"),
    ("input_size=0", (0, 5), {}, "input_size"),
    ("num_layers=0", (4, 5), {"num_layers": 0}, "num_layers"),
    ("hidden_size=-1", (4, -1), {}, "hidden_size"),
    ("hidden_size=5.0", (4, 5.0), {}, "hidden_size"),
    ("input_size='4'", ("4", 5), {}, "input_size"),
    ("num_layers=2.0", (4, 5), {"num_layers": 2.0}, "num_layers"),
    ("num_layers=True", (4, 5), {"num_layers": True}, "num_layers"),
    ("hidden_size=True", (4, True), {}, "hidden_size"),
    ("dropout=1.5", (4, 5), {"dropout": 1.5}, "dropout"),
    ("dropout=-0.5", (4, 5), {"dropout": -0.5}, "dropout"),
    ("dropout=True", (4, 5), {"dropout": True}, "dropout"),
    ("dropout='0.1'", (4, 5), {"dropout": "0.1"}, "dropout"),
    ("dropout=1 int", (4, 5), {"dropout": 1, "num_layers": 2}, "dropout"),
    ("proj_size=2", (4, 5), {"proj_size": 2}, "proj_size"),
    ("proj_size=-1", (4, 5), {"proj_size": -1}, "proj_size"),
    ("bias=1", (4, 5), {"bias": 1}, "bias"),
    ("batch_first=1", (4, 5), {"batch_first": 1}, "batch_first"),
    ("bidirectional=1", (4, 5), {"bidirectional": 1}, "bidirectional"),
    ("bidirectional=0", (4, 5), {"bidirectional": 0}, "bidirectional"),
    ("all positional", (4, 5, 2, False, True, 0.0, True), {}, "-"),
    ("proj_size=0 positional", (4, 5, 1, True, False, 0.0, False, 0), {}, "-"),
]


@pytest.mark.parametrize("args,kwargs,argument", [c[1:] for c in GRU_CONSTRUCTOR_CASES],
                         ids=[c[0] for c in GRU_CONSTRUCTOR_CASES])
def test_gru_constructor_like_nn_gru(args, kwargs, argument):
    expected, got = _same_behaviour(lambda: nn.GRU(*args, **kwargs),
                                    lambda: FusedGRU(*args, **kwargs), argument)
    if got is not None:
        for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first",
                     "bidirectional", "proj_size", "mode"):
            assert bool(getattr(got, name)) == bool(getattr(expected, name)), name
        assert [tuple(p.shape) for p in got.parameters()] == [
            tuple(p.shape) for p in expected.parameters()]


def test_proj_size_0_by_keyword_is_the_one_stated_difference():
    # nn.GRU rejects ANY proj_size keyword, 0 included (it checks `"proj_size" in kwargs`),
    # but accepts proj_size=0 positionally.  A named parameter cannot tell the two apart;
    # FusedGRU accepts 0 either way (it is what a GRU computes) and rejects the rest.
    with pytest.raises(ValueError):
        nn.GRU(4, 5, proj_size=0)
    assert FusedGRU(4, 5, proj_size=0).proj_size == 0


CELL_CONSTRUCTOR_CASES = [
    ("hidden_size=0", (10, 0), "hidden_size"),
    ("input_size=0", (0, 5), "input_size"),
    ("both 0", (0, 0), "input_size"),
    ("hidden_size=-1", (4, -1), "hidden_size"),
    ("input_size=-2", (-2, 4), "input_size"),
    ("hidden_size=5.0", (4, 5.0), "hidden_size"),
    ("bias=False", (4, 5, False), "bias"),
]


@pytest.mark.parametrize("args,argument", [c[1:] for c in CELL_CONSTRUCTOR_CASES],
                         ids=[c[0] for c in CELL_CONSTRUCTOR_CASES])
def test_cell_constructor_like_nn_grucell(args, argument):
    _same_behaviour(lambda: nn.GRUCell(*args), lambda: FusedGRUCell(*args), argument)


def _pair(cls_torch, cls_fused, *args, **kwargs):
    torch.manual_seed(0)
    t = cls_torch(*args, **kwargs)
    f = cls_fused(*args, **kwargs)
    f.load_state_dict(t.state_dict())
    return t, f


# (id, module kwargs, input, hx, the argument a rejection must name); I=4, H=5, 2 layers.
GRU_FORWARD_CASES = [
    ("batched", {}, lambda: r(3, 2, 4), None, "-"),
    ("unbatched", {}, lambda: r(3, 4), None, "-"),
    ("unbatched hx", {}, lambda: r(3, 4), lambda: r(2, 5), "-"),
    ("batch_first", {"batch_first": True}, lambda: r(2, 3, 4), lambda: r(2, 2, 5), "-"),
    ("empty batch", {}, lambda: r(3, 0, 4), None, "-"),
    ("empty batch hx", {}, lambda: r(3, 0, 4), lambda: r(2, 0, 5), "-"),
    ("bidirectional empty batch", {"bidirectional": True}, lambda: r(3, 0, 4), None, "-"),
    ("feature size", {}, lambda: r(3, 2, 7), None, "input"),
    ("feature size 0", {}, lambda: r(3, 2, 0), None, "input"),
    ("1-D input", {}, lambda: r(4), None, "input"),
    ("4-D input", {}, lambda: r(1, 3, 2, 4), None, "input"),
    ("0 steps", {}, lambda: r(0, 2, 4), None, "input"),
    ("0 steps unbatched", {}, lambda: r(0, 4), None, "input"),
    ("0 steps batch_first", {"batch_first": True}, lambda: r(2, 0, 4), None, "input"),
    ("hx batch", {}, lambda: r(3, 2, 4), lambda: r(2, 3, 5), "hx"),
    ("hx layers", {}, lambda: r(3, 2, 4), lambda: r(1, 2, 5), "hx"),
    ("hx hidden", {}, lambda: r(3, 2, 4), lambda: r(2, 2, 6), "hx"),
    ("hx 2-D for 3-D input", {}, lambda: r(3, 2, 4), lambda: r(2, 5), "hx"),
    ("hx 3-D for 2-D input", {}, lambda: r(3, 4), lambda: r(2, 2, 5), "hx"),
    ("hx bidirectional", {"bidirectional": True}, lambda: r(3, 2, 4), lambda: r(2, 2, 5), "hx"),
    ("float64 input", {}, lambda: r(3, 2, 4, dtype=torch.float64), None, "input"),
    ("float16 input", {}, lambda: r(3, 2, 4).half(), None, "input"),
    ("int input", {}, lambda: torch.ones(3, 2, 4, dtype=torch.int64), None, "input"),
    ("float64 hx", {}, lambda: r(3, 2, 4), lambda: r(2, 2, 5, dtype=torch.float64), "hx"),
    ("int hx", {}, lambda: r(3, 2, 4), lambda: torch.ones(2, 2, 5, dtype=torch.int64), "hx"),
    ("list hx", {}, lambda: r(3, 2, 4), lambda: [1.0], "hx"),
    ("list input", {}, lambda: [[1.0]], None, "input"),
]


@pytest.mark.parametrize("kwargs,make_x,make_hx,argument", [c[1:] for c in GRU_FORWARD_CASES],
                         ids=[c[0] for c in GRU_FORWARD_CASES])
def test_gru_forward_like_nn_gru(kwargs, make_x, make_hx, argument):
    t, f = _pair(nn.GRU, FusedGRU, 4, 5, num_layers=2, **kwargs)
    x, hx = make_x(), (make_hx() if make_hx else None)
    expected, got = _same_behaviour(lambda: t(x, hx), lambda: f(x, hx), argument)
    if got is not None:
        _check_same_outputs(expected, got)


# (id, (input_size, hidden_size), input, hx, the argument a rejection must name)
CELL_FORWARD_CASES = [
    ("batched", (4, 5), lambda: r(2, 4), None, "-"),
    ("unbatched", (4, 5), lambda: r(4), None, "-"),
    ("unbatched hx", (4, 5), lambda: r(4), lambda: r(5), "-"),
    ("empty batch", (4, 5), lambda: r(0, 4), None, "-"),
    ("hidden_size 0", (10, 0), lambda: r(2, 10), None, "-"),
    ("hidden_size 0 hx", (10, 0), lambda: r(2, 10), lambda: r(2, 0), "-"),
    ("input_size 0", (0, 5), lambda: r(2, 0), lambda: r(2, 5), "-"),
    ("feature size", (4, 5), lambda: r(2, 7), None, "input"),
    ("3-D input", (4, 5), lambda: r(1, 2, 4), None, "input"),
    ("0-D input", (4, 5), lambda: torch.tensor(1.0), None, "input"),
    ("hx batch", (4, 5), lambda: r(2, 4), lambda: r(3, 5), "hx"),
    ("hx hidden", (4, 5), lambda: r(2, 4), lambda: r(2, 6), "hx"),
    ("hx 1-D for 2-D input", (4, 5), lambda: r(2, 4), lambda: r(5), "hx"),
    ("unbatched hx hidden", (4, 5), lambda: r(4), lambda: r(6), "hx"),
    ("float64 input", (4, 5), lambda: r(2, 4, dtype=torch.float64), None, "input"),
    ("int input", (4, 5), lambda: torch.ones(2, 4, dtype=torch.int64), None, "input"),
    ("float64 hx", (4, 5), lambda: r(2, 4), lambda: r(2, 5, dtype=torch.float64), "hx"),
    ("list hx", (4, 5), lambda: r(2, 4), lambda: [1.0], "hx"),
]


@pytest.mark.parametrize("sizes,make_x,make_hx,argument", [c[1:] for c in CELL_FORWARD_CASES],
                         ids=[c[0] for c in CELL_FORWARD_CASES])
def test_cell_forward_like_nn_grucell(sizes, make_x, make_hx, argument):
    t, f = _pair(nn.GRUCell, FusedGRUCell, *sizes)
    x, hx = make_x(), (make_hx() if make_hx else None)
    expected, got = _same_behaviour(lambda: t(x, hx), lambda: f(x, hx), argument)
    if got is not None:
        _check_same_outputs(expected, got)


def test_what_code_reads_off_an_nn_gru():
    t, f = _pair(nn.GRU, FusedGRU, 4, 5, num_layers=2, bidirectional=True)
    assert f.mode == t.mode == "GRU"
    assert f.proj_size == t.proj_size == 0
    assert f._all_weights == t._all_weights
    assert f._flat_weights_names == t._flat_weights_names
    assert [w.shape for ws in f.all_weights for w in ws] == [
        w.shape for ws in t.all_weights for w in ws]
    f.flatten_parameters()
    tb, fb = _pair(nn.GRU, FusedGRU, 4, 5, bias=False)
    assert fb._all_weights == tb._all_weights
