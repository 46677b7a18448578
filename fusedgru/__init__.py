"""fusedgru: a drop-in torch.nn.GRU whose recurrence runs in fused kernels.

    from fusedgru import FusedGRU
    gru = FusedGRU(input_size, hidden_size, num_layers=2, batch_first=True)

See README.md for the backends and docs/SPEC.md for what they compute.
"""

from . import errors, functional, reference
from .backends import BackendUnavailableError, available_backends, backend_status
from .convert import GRU_CELL_TYPES, GRU_TYPES, to_fused, to_torch
from .modules import FusedGRU, FusedGRUCell
from .version import __version__

__all__ = [
    "FusedGRU",
    "FusedGRUCell",
    "to_fused",
    "to_torch",
    "GRU_TYPES",
    "GRU_CELL_TYPES",
    "errors",
    "available_backends",
    "backend_status",
    "BackendUnavailableError",
    "functional",
    "reference",
    "__version__",
]
