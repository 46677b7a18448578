"""TorchScript: torch.jit.trace of a model holding FusedGRU / FusedGRUCell passes trace's
own sanity check (the graph is the same on every invocation, whatever the grad mode) and
computes what eager does; torch.jit.script refuses with an error that says what to use
instead, and scripting the converted-back model works."""

import warnings

import pytest
import torch
from torch import nn

import fusedgru
from fusedgru import FusedGRU, FusedGRUCell
from fusedgru.errors import ScriptingUnsupportedError


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = FusedGRU(4, 5, num_layers=2, bidirectional=True, batch_first=True)
        self.cell = FusedGRUCell(10, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        y, _ = self.gru(x)
        return self.head(self.cell(y[:, -1]))


@pytest.fixture(autouse=True)
def quiet_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)   # torch.jit.* is deprecated in 2.14
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def test_trace_passes_its_check_and_matches_eager(gen):
    model = Model()
    x = torch.randn(2, 6, 4, generator=gen)
    traced = torch.jit.trace(model, (x,))  # check_trace=True: re-traces and compares graphs
    x2 = torch.randn(2, 6, 4, generator=gen)
    torch.testing.assert_close(traced(x2), model(x2))
    with torch.no_grad():
        torch.testing.assert_close(traced(x2), model(x2))
    x2.requires_grad_()
    traced(x2).sum().backward()
    assert x2.grad is not None and torch.isfinite(x2.grad).all()


def test_trace_under_no_grad_passes_its_check(gen):
    model = Model()
    with torch.no_grad():
        traced = torch.jit.trace(model, (torch.randn(2, 6, 4, generator=gen),))
    x = torch.randn(2, 6, 4, generator=gen)
    torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize("module", [lambda: FusedGRU(4, 5), lambda: FusedGRUCell(4, 5),
                                    lambda: nn.Sequential(Model())], ids=["gru", "cell", "nested"])
def test_script_refuses_and_says_what_to_use(module):
    with pytest.raises(ScriptingUnsupportedError, match=r"torch.jit.script does not support "
                       r"FusedGRU.*torch.compile.*fusedgru.to_torch\(model\)"):
        torch.jit.script(module())
    with pytest.raises(RuntimeError):  # what code catching TorchScript's failures expects
        torch.jit.script(module())


def test_script_of_the_converted_back_model_works(gen):
    model = Model()
    x = torch.randn(2, 6, 4, generator=gen)
    expected = model(x)
    scripted = torch.jit.script(fusedgru.to_torch(model))
    torch.testing.assert_close(scripted(x), expected)
