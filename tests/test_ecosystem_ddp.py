"""DistributedDataParallel and FSDP2 (fully_shard) over gloo, 2 CPU processes: a training
step of a model holding FusedGRU averages its gradients exactly as one process on the whole
batch computes them (float64; multi-GPU training uses DDP / FSDP as with nn.GRU, nothing
fusedgru-specific)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

import fusedgru
from fusedgru import FusedGRU, backends

F64 = torch.float64
WORLD = 2
BACKENDS = [b for b in fusedgru.available_backends()
            if backends.get_backend(b).unsupported_reason("cpu", F64) is None]


class Model(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.gru = FusedGRU(3, 5, num_layers=2, bidirectional=True, batch_first=True,
                            dtype=F64, backend=backend)
        self.head = torch.nn.Linear(10, 1, dtype=F64)

    def forward(self, x):
        y, h_n = self.gru(x)
        return self.head(y).squeeze(-1), h_n


def _data():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(4 * WORLD, 6, 3, dtype=F64, generator=g), \
        torch.randn(4 * WORLD, 6, dtype=F64, generator=g)


def _loss(model, x, target):
    out, h_n = model(x)
    # A per-example mean, so that the mean over ranks equals the mean over the whole batch.
    return ((out - target) ** 2).mean() + h_n.pow(2).sum(dim=(0, 2)).mean()


def _full(t):
    """A plain tensor (FSDP2 shards parameters and gradients as DTensors)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    _loss(model, x, target).backward()
    grads = {n.removeprefix("module."): _full(p.grad) for n, p in model.named_parameters()}
    opt.step()
    params = {n.removeprefix("module."): _full(p) for n, p in model.named_parameters()}
    return grads, params


def _worker(rank, port, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)
    try:
        x, target = _data()
        shard = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for backend in BACKENDS:
            torch.manual_seed(0)  # the same initial weights on every rank (DDP also syncs)
            model = torch.nn.parallel.DistributedDataParallel(Model(backend))
            results["ddp", backend] = _step(model, x[shard], target[shard])
            torch.manual_seed(0)
            model = Model(backend)
            fully_shard(model.gru)  # FusedGRU's parameters as one sharded group
            fully_shard(model)
            results["fsdp", backend] = _step(model, x[shard], target[shard])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_distributed_gradients_equal_whole_batch(ddp_results, wrapper, backend):
    x, target = _data()
    torch.manual_seed(0)
    grads, params = _step(Model(backend), x, target)
    for rank, results in enumerate(ddp_results):
        got_grads, got_params = results[wrapper, backend]
        assert got_grads.keys() == grads.keys()
        for name in grads:
            torch.testing.assert_close(got_grads[name], grads[name], rtol=1e-12, atol=1e-14,
                                       msg=f"{wrapper} rank {rank} grad {name}")
            torch.testing.assert_close(got_params[name], params[name], rtol=1e-12, atol=1e-14,
                                       msg=f"{wrapper} rank {rank} param {name}")
