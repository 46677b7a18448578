"""Whole-model conversion: every nn.GRU / nn.GRUCell of a model to its fused twin and back.

    model = fusedgru.to_fused(model)      # in place; returns the model (or its new root)
    model = fusedgru.to_torch(model)      # back to nn.GRU / nn.GRUCell

The twin takes over the original's Parameter objects (not copies): an optimizer built
before the conversion keeps updating the same tensors, tied or frozen weights stay tied or
frozen, and device, dtype and training mode are the original's.  Forward hooks and other
per-module state are not carried over; register them after converting.

Code that finds GRUs with ``isinstance(m, nn.GRU)`` (init loops, weight decay groups) does
not see a FusedGRU: FusedGRU cannot subclass nn.GRU, because TorchDynamo refuses to trace
nn.GRU instances, which would end fullgraph compilation.  Test against ``GRU_TYPES`` /
``GRU_CELL_TYPES`` instead, or run such code before ``to_fused``.
"""

from __future__ import annotations

from typing import Tuple, Type

from torch import nn

from .modules import FusedGRU, FusedGRUCell

__all__ = ["to_fused", "to_torch", "GRU_TYPES", "GRU_CELL_TYPES"]

# isinstance(m, GRU_TYPES) holds for nn.GRU and FusedGRU alike.
GRU_TYPES: Tuple[Type[nn.Module], ...] = (nn.GRU, FusedGRU)
GRU_CELL_TYPES: Tuple[Type[nn.Module], ...] = (nn.GRUCell, FusedGRUCell)


def _fused_twin(m: nn.Module, backend: str) -> nn.Module:
    cls = FusedGRU if isinstance(m, nn.GRU) else FusedGRUCell
    return cls.from_torch(m, backend=backend, share=True)


def _torch_twin(m: nn.Module) -> nn.Module:
    return m.to_torch(share=True)


def _replace(model: nn.Module, types, twin) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if type(model) in types:
        return twin(model)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) in types:  # exact types: a user's subclass may change forward
                setattr(parent, name, twin(child))
    return model


def to_fused(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replaces, in place, every torch.nn.GRU and nn.GRUCell in ``model`` with a FusedGRU /
    FusedGRUCell computing the same function on the same Parameter objects.  Returns the
    model (a new module when ``model`` itself is an nn.GRU or nn.GRUCell).  Subclasses of
    nn.GRU are left alone: their forward may differ."""
    return _replace(model, (nn.GRU, nn.GRUCell), lambda m: _fused_twin(m, backend))


def to_torch(model: nn.Module) -> nn.Module:
    """The inverse of ``to_fused``: every FusedGRU / FusedGRUCell in ``model`` becomes a
    torch.nn.GRU / nn.GRUCell on the same Parameter objects, in place (ValueError for a
    reset_after=False module, which torch.nn cannot compute).  Use it before tools that
    only know torch.nn's modules: torch.jit.script, quantize_dynamic."""
    return _replace(model, (FusedGRU, FusedGRUCell), _torch_twin)
