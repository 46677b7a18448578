"""fusedgru: a drop-in torch.nn.GRU whose recurrence runs in fused kernels.

    from fusedgru import FusedGRU
    gru = FusedGRU(input_size, hidden_size, num_layers=2, batch_first=True)

See README.md for the backends and ../shared/SPEC.md for what they compute.
"""

from . import functional, reference
from .backends import BackendUnavailableError, available_backends, backend_status
from .modules import FusedGRU, FusedGRUCell
from .version import __version__

__all__ = [
    "FusedGRU",
    "FusedGRUCell",
    "available_backends",
    "backend_status",
    "BackendUnavailableError",
    "functional",
    "reference",
    "__version__",
]
