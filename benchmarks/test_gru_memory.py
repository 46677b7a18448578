"""Training memory of each fusedgru backend beside torch.nn.GRU on the same cell.

What a GRU keeps for its backward is what grows with T * B: SPEC section 4 says a fused
layer-direction keeps its output y (H per row per step) and ws = [r, z, n, W_hn h + b_hn]
(4H), plus its input (I per row per step; the model's input itself is not counted, but a
reversed or concatenated copy made for a layer-direction is).  This test holds every
backend to that bound and records nn.GRU's figure beside it (on a GPU also the allocator's
peak over one forward + backward).
"""

import torch

from fusedgru import bench


def _spec_bound_bytes(case: bench.Case) -> int:
    """Bytes SPEC section 4 allows one training forward to keep, all layer-directions."""
    elems = 0
    for layer in range(case.layers):
        in_size = case.I if layer == 0 else case.D * case.H
        for direction in range(case.D):
            x_copy = in_size if (layer > 0 or direction == 1) else 0
            elems += case.T * case.B * (5 * case.H + x_copy)
    elem = torch.empty((), dtype=bench.DTYPES[case.dtype]).element_size()
    return elems * elem


def test_training_memory(memory_cell, bench_options, record_property):
    case, provider = memory_cell
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = provider.unsupported(case, device)
    if why is not None:
        import pytest

        pytest.skip(f"{provider.name} does not run {case.label}: {why}")
    data = bench.make_cell_data(case, device, bench_options.seed)
    dtype = bench.DTYPES[case.dtype]
    nn_gru = bench._cast_gru(data.gru64, dtype)
    fused = provider.build(bench._cast_gru(data.gru64, dtype))

    saved_nn = bench.saved_activation_bytes(nn_gru, case, data)
    saved = bench.saved_activation_bytes(fused, case, data)
    bound = _spec_bound_bytes(case)
    # 1% + 64 KiB of slack: per-step h_n selections and index tensors, not activations.
    assert saved <= bound * 1.01 + 65536, (
        f"{provider.name} keeps {saved} bytes for the backward on {case.label}; SPEC section "
        f"4 allows {bound} (y + 4H values per row per step + input copies); nn.GRU keeps "
        f"{saved_nn}")
    assert saved > 0, "nothing was saved for the backward: the measurement is broken"
    record_property("saved_bytes", saved)
    record_property("saved_bytes_nn_gru", saved_nn)
    if device.type == "cuda":
        peak = bench.peak_memory(bench._callable(fused, case, data), device)
        peak_nn = bench.peak_memory(bench._callable(nn_gru, case, data), device)
        record_property("peak_mem_bytes", peak)
        record_property("peak_mem_bytes_nn_gru", peak_nn)
