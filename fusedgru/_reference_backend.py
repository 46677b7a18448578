"""The "reference" row of the backend table: fusedgru/reference.py behind registered ops."""

from __future__ import annotations

from typing import Optional

import torch

from . import ops


class _ReferenceBackend:
    name = "reference"
    forward = staticmethod(ops.reference_fwd)
    backward = staticmethod(ops.reference_bwd)
    # Plain PyTorch ops in a fixed order, no atomics: PyTorch's own determinism applies.
    deterministic = True

    @staticmethod
    def unavailable_reason() -> Optional[str]:
        return None

    @staticmethod
    def unsupported_reason(device_type: str, dtype: torch.dtype) -> Optional[str]:
        if not dtype.is_floating_point:
            return f"expected a floating-point dtype, got {dtype}"
        return None


backend = _ReferenceBackend()
