"""The exceptions FusedGRU raises for bad input: fusedgru's own messages, nn.GRU's classes.

nn.GRU and nn.GRUCell reject bad input with classes that vary from case to case (a wrong
feature size is a RuntimeError, a wrong number of dimensions a ValueError, a list in
place of a tensor an AttributeError).  Code around a model catches those classes, so every
exception fusedgru raises for an input nn.GRU rejects is an instance of the class nn.GRU
raises there, and also of the class that describes the mistake.  Each class below derives
from all the built-in classes nn.GRU uses for that kind of mistake, so ``except
RuntimeError`` and ``except ValueError`` both keep working.

tests/test_dropin.py runs every case through nn.GRU and FusedGRU side by side.
"""

from __future__ import annotations

__all__ = ["ShapeError", "DTypeError", "NotATensorError", "ArgumentTypeError", "ScriptingUnsupportedError"]


class ShapeError(ValueError, RuntimeError):
    """A tensor or size argument has the wrong shape or value: nn.GRU raises RuntimeError
    (feature size, hx shape, an empty sequence) or ValueError (number of dimensions)."""


class DTypeError(TypeError, ValueError, RuntimeError):
    """A tensor has the wrong dtype: nn.GRU raises ValueError (input vs weights) and
    RuntimeError (hx, GRUCell's input) for it."""


class NotATensorError(TypeError, AttributeError):
    """A tensor argument is something else: nn.GRU fails with AttributeError there."""


class ArgumentTypeError(TypeError, ValueError):
    """A constructor argument has the wrong type where nn.GRU raises ValueError (dropout)."""


class ScriptingUnsupportedError(RuntimeError):
    """torch.jit.script of a model holding a fused module (TorchScript's own failures are
    RuntimeErrors too)."""
