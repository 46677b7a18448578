"""torch.compile (fullgraph=True: no graph breaks) and torch.export of a model holding
FusedGRU, for every backend that runs CPU tensors here; the CUDA modes are in
tests/test_ecosystem_gpu.py.  Each compile costs ~15-30 s on 2 cores, so one compiled model
per backend serves every assertion (eager parity forward and backward, dynamic T and B
without a recompile)."""

import pytest
import torch

from fusedgru import FusedGRU, backends
from fusedgru.testing import cpu_backend_dtypes, rel_err

F64 = torch.float64


CPU_BACKENDS = [pytest.param(name, dtype, id=name) for name, dtype in cpu_backend_dtypes()]
# Compiled float32 Linear layers round differently from eager ones (fused kernels); the
# recurrence itself is the same op in both.  float64 models agree to rounding.
TOL = {F64: 1e-12, torch.float32: 1e-5}


class Tagger(torch.nn.Module):
    """Linear -> FusedGRU (2 layers, bidirectional, batch_first) -> Linear."""

    def __init__(self, backend, dtype, reset_after=True):
        super().__init__()
        self.embed = torch.nn.Linear(3, 6, dtype=dtype)
        self.gru = FusedGRU(6, 5, num_layers=2, batch_first=True, bidirectional=True,
                            dtype=dtype, reset_after=reset_after, backend=backend)
        self.head = torch.nn.Linear(10, 2, dtype=dtype)

    def forward(self, x, h0=None):
        y, h_n = self.gru(torch.tanh(self.embed(x)), h0)
        return self.head(y), h_n


def _step(model, x, h0):
    """Forward and backward of a random-ish loss; returns outputs and every gradient."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    h0 = h0.detach().requires_grad_()
    out, h_n = model(x, h0)
    loss = (out * out.detach().sin()).sum() + (h_n * h_n.detach().cos()).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in getattr(model, "_orig_mod", model).named_parameters()}
    grads.update(input=x.grad, h0=h0.grad)
    return out.detach(), h_n.detach(), grads


def _assert_same(a, b, tol):
    (oa, ha, ga), (ob, hb, gb) = a, b
    assert rel_err(oa, ob) < tol, "output"
    assert rel_err(ha, hb) < tol, "h_n"
    for k in gb:
        assert rel_err(ga[k], gb[k]) < tol, f"grad {k}"


def _inputs(B, T, dtype, gen):
    return (torch.randn(B, T, 3, dtype=dtype, generator=gen),
            torch.randn(4, B, 5, dtype=dtype, generator=gen))


@pytest.mark.parametrize("backend,dtype", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend, dtype, gen):
    torch._dynamo.reset()
    model = Tagger(backend, dtype, reset_after=backend != "cpu")
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    # B and T differ from every other input size (3, 4, 5): dynamo gives equal sizes one
    # symbol, and the Linear layers specialise the feature sizes.
    x, h0 = _inputs(6, 7, dtype, gen)
    _assert_same(_step(compiled, x, h0), _step(model, x, h0), TOL[dtype])
    # New batch size and sequence length: the same graph, no recompile.
    x, h0 = _inputs(2, 7, dtype, gen)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = _step(compiled, x, h0)
    _assert_same(got, _step(model, x, h0), TOL[dtype])


def test_compile_reduce_overhead_matches_eager(gen):
    """mode="reduce-overhead" (CUDA graphs on a GPU; on the CPU it compiles as the default
    mode: this checks the mode is accepted and traces without graph breaks)."""
    torch._dynamo.reset()
    model = Tagger("reference", F64)
    compiled = torch.compile(model, fullgraph=True, mode="reduce-overhead")
    x, h0 = _inputs(2, 3, F64, gen)
    _assert_same(_step(compiled, x, h0), _step(model, x, h0), TOL[F64])


@pytest.mark.parametrize("backend,dtype", CPU_BACKENDS)
def test_export_runs_and_matches_eager(backend, dtype, gen):
    """torch.export with dynamic batch and sequence length: the program holds the backend's
    forward op (4 layer-directions), runs on new shapes and matches eager."""
    model = Tagger(backend, dtype).eval()
    x, h0 = _inputs(3, 4, dtype, gen)
    B = torch.export.Dim("B", min=2, max=256)
    T = torch.export.Dim("T", min=2, max=4096)
    ep = torch.export.export(model, (x, h0), dynamic_shapes=({0: B, 1: T}, {1: B}))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("fusedgru" in t and t.endswith("_fwd.default") for t in targets) == 4, targets
    for B_, T_ in [(3, 4), (5, 9)]:
        x, h0 = _inputs(B_, T_, dtype, gen)
        got, want = ep.module()(x, h0), model(x, h0)
        for a, b in zip(got, want):
            assert rel_err(a, b) < TOL[dtype]


def test_export_save_load_roundtrip(tmp_path, gen):
    """The exported program serialises (the ops are named by their dispatcher schema) and
    the loaded program computes the same as eager, once fusedgru is imported."""
    model = Tagger("reference", F64).eval()
    x, h0 = _inputs(2, 3, F64, gen)
    ep = torch.export.export(model, (x, h0))
    path = tmp_path / "tagger.pt2"
    torch.export.save(ep, path)
    loaded = torch.export.load(path)
    for a, b in zip(loaded.module()(x, h0), model(x, h0)):
        assert rel_err(a, b) < TOL[F64]


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
def test_compile_fullgraph_with_a_packed_sequence(enforce_sorted, gen):
    """A PackedSequence in and out of a fullgraph compile: packed unsorted, the padded batch
    size is the length of sorted_indices; packed sorted, it is a value (batch_sizes[0]), an
    unbacked size to the compiler.  Outputs, h_n and the input's gradient match nn.GRU's,
    for two batches of different lengths."""
    from torch.nn.utils.rnn import pack_padded_sequence

    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = torch.nn.GRU(4, 5, num_layers=2, bidirectional=True, dtype=F64)
    model = FusedGRU(4, 5, num_layers=2, bidirectional=True, dtype=F64)
    model.load_state_dict(ref.state_dict())
    compiled = torch.compile(model, fullgraph=True)

    def run(gru, x, lengths):
        x = x.detach().clone().requires_grad_()
        out, h_n = gru(pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted))
        assert type(out).__name__ == "PackedSequence"
        (out.data.sin().sum() + h_n.cos().sum()).backward()
        return out.data.detach(), h_n.detach(), x.grad

    for lengths in ([6, 4, 2], [7, 5, 5, 1]):
        lengths = torch.tensor(sorted(lengths, reverse=True) if enforce_sorted
                               else lengths[1:] + lengths[:1])
        x = torch.randn(int(lengths.max()), len(lengths), 4, dtype=F64, generator=gen)
        for got, want in zip(run(compiled, x, lengths), run(ref, x, lengths)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
