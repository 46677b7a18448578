"""PackedSequence <-> padded (T, B, *) as two registered ops, so torch.compile traces them.

torch.nn.utils.rnn.pad_packed_sequence is skipped by TorchDynamo (a fullgraph compile of a
model fed a PackedSequence failed there), and the padded batch size of a PackedSequence
is a value (batch_sizes[0]), not a shape.  These ops are opaque to the compiler: their fake
implementations give the padded batch size as the length of ``sorted_indices`` when the
sequence was packed unsorted, and as an unbacked size (at least 1) otherwise.

    to_padded(packed)              -> (padded (T, B, *) in the original batch order,
                                       lengths (B,) int64 on batch_sizes' device)
    to_packed(padded, like=packed) -> the data of a PackedSequence laid out like ``like``
    packed_indices(packed)         -> (reverse (N,), last (B,)): the row permutation that
                                      reverses every sequence within its own length (its
                                      own inverse), and each sequence's last row

Both are exact (a gather and its scatter) and differentiable (each one's gradient is the
other), and match pad_packed_sequence / pack_padded_sequence (tests/test_module.py).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

__all__ = ["to_padded", "to_packed", "packed_indices"]


def _layout(batch_sizes: Tensor, B: int, device) -> Tuple[Tensor, Tensor]:
    """mask (T, B): row j of the sorted batch is active at step t; index (T, B): its row
    in the packed data."""
    bs = batch_sizes.to(device)
    j = torch.arange(B, device=device)
    mask = j.unsqueeze(0) < bs.unsqueeze(1)
    offsets = torch.cumsum(bs, 0) - bs
    return mask, offsets.unsqueeze(1) + j.unsqueeze(0)


@torch.library.custom_op("fusedgru::packed_to_padded", mutates_args=())
def _packed_to_padded(data: Tensor, batch_sizes: Tensor,
                      sorted_indices: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    T = batch_sizes.shape[0]
    B = int(batch_sizes[0]) if sorted_indices is None else sorted_indices.shape[0]
    mask, index = _layout(batch_sizes, B, data.device)
    padded = data.new_zeros(T, B, *data.shape[1:])
    padded[mask] = data[index[mask]]
    lengths = mask.sum(0).to(device=batch_sizes.device, dtype=torch.int64)
    if sorted_indices is not None:  # sorted row j is original row sorted_indices[j]
        padded = torch.empty_like(padded).index_copy_(1, sorted_indices, padded)
        lengths = torch.empty_like(lengths).index_copy_(0, sorted_indices.to(lengths.device), lengths)
    return padded, lengths


@_packed_to_padded.register_fake
def _(data, batch_sizes, sorted_indices):
    T = batch_sizes.shape[0]
    if sorted_indices is not None:
        B = sorted_indices.shape[0]
    else:
        B = torch.library.get_ctx().new_dynamic_size(min=1)
    return (data.new_empty(T, B, *data.shape[1:]),
            batch_sizes.new_empty(B, dtype=torch.int64))


@torch.library.custom_op("fusedgru::padded_to_packed", mutates_args=())
def _padded_to_packed(padded: Tensor, batch_sizes: Tensor, sorted_indices: Optional[Tensor],
                      total: int) -> Tensor:
    B = padded.shape[1]
    if sorted_indices is not None:
        padded = padded.index_select(1, sorted_indices)
    mask, _ = _layout(batch_sizes, B, padded.device)
    return padded[mask].clone()  # (total, *): step-major, sorted rows within a step


@_padded_to_packed.register_fake
def _(padded, batch_sizes, sorted_indices, total):
    return padded.new_empty(total, *padded.shape[2:])


def _setup(ctx, inputs, output):
    ctx.batch_sizes, ctx.sorted_indices = inputs[1], inputs[2]
    ctx.total = inputs[0].shape[0]


def _to_padded_backward(ctx, grad_padded, grad_lengths):
    if grad_padded is None:
        return None, None, None
    return _padded_to_packed(grad_padded.contiguous(), ctx.batch_sizes, ctx.sorted_indices,
                             ctx.total), None, None


def _to_packed_backward(ctx, grad_data):
    return _packed_to_padded(grad_data.contiguous(), ctx.batch_sizes, ctx.sorted_indices)[0], \
        None, None, None


_packed_to_padded.register_autograd(_to_padded_backward, setup_context=_setup)
_padded_to_packed.register_autograd(_to_packed_backward, setup_context=_setup)


def to_padded(packed: PackedSequence) -> Tuple[Tensor, Tensor]:
    """(padded (T, B, *), lengths (B,)) in the original batch order, as pad_packed_sequence."""
    return _packed_to_padded(packed.data, packed.batch_sizes, packed.sorted_indices)


def to_packed(padded: Tensor, like: PackedSequence) -> PackedSequence:
    """``padded`` (T, B, *) in the original batch order, packed as ``like`` is."""
    data = _padded_to_packed(padded.contiguous(), like.batch_sizes, like.sorted_indices,
                             like.data.shape[0])
    return PackedSequence(data, like.batch_sizes, like.sorted_indices, like.unsorted_indices)


@torch.library.custom_op("fusedgru::packed_indices", mutates_args=())
def _packed_indices(batch_sizes: Tensor, sorted_indices: Optional[Tensor], total: int,
                    device: torch.device) -> Tuple[Tensor, Tensor]:
    bs = batch_sizes.to(torch.int64)
    T = bs.shape[0]
    B = int(bs[0])
    offsets = torch.cumsum(bs, 0) - bs
    lengths = (bs.unsqueeze(0) > torch.arange(B).unsqueeze(1)).sum(1)  # (B,)
    t = torch.repeat_interleave(torch.arange(T), bs, output_size=total)  # step of each row
    b = torch.arange(total) - offsets[t]  # its row within the step
    reverse = offsets[lengths[b] - 1 - t] + b
    last = offsets[lengths - 1] + torch.arange(B)
    return reverse.to(device), last.to(device)


@_packed_indices.register_fake
def _(batch_sizes, sorted_indices, total, device):
    if sorted_indices is not None:
        B = sorted_indices.shape[0]
    else:
        B = torch.library.get_ctx().new_dynamic_size(min=1)
    return (torch.empty(total, dtype=torch.int64, device=device),
            torch.empty(B, dtype=torch.int64, device=device))


def packed_indices(packed: PackedSequence) -> Tuple[Tensor, Tensor]:
    """For the packed data's rows (step-major, length-sorted rows within a step):
    reverse (N,): row n = (step t, row b) -> the row (len_b - 1 - t, b), which reverses each
    sequence within its own length (applying it twice is the identity); last (B,): the row
    of each sequence's last step, in sorted order.  On the data's device."""
    return _packed_indices(packed.batch_sizes, packed.sorted_indices, packed.data.shape[0],
                           packed.data.device)
