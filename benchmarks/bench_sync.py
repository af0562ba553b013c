"""The cost of synchronizing BatchNorm across processes: 2 gloo processes on this machine (CPU
loopback), training-mode BatchNorm2d forward + backward on each rank's batch, synchronized
(bnext.distributed and the sync ops: one all_gather in forward, one all_reduce in backward) vs local
(each rank alone, no collectives).

    pytest benchmarks/bench_sync.py --benchmark-only

The pytest process is rank 0 and is the one timed; rank 1 is a helper process started by the module
fixture that runs the same steps at the same time (told what to run through broadcast_object_list),
so that both variants are timed with two busy processes, 1 torch thread each. Shapes are per rank.
"""
import multiprocessing
import os
import socket

import pytest
import torch
import torch.distributed as dist

from bnext import nn as bnn
from conftest import ROUNDS

WORLD = 2
SHAPES = [(32, 64, 8, 8), (64, 128, 16, 16)]  # per rank: 0.5 MB and 8.4 MB of fp32
VARIANTS = ["local", "synced"]
WARMUP = 3


def make_step(variant, shape, rank):
    torch.manual_seed(rank)
    C = shape[1]
    m = bnn.BatchNorm2d(C, process_group=dist.group.WORLD if variant == "synced" else None).train()
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    params = (x, m.weight, m.bias)

    def step():
        y = m(x)
        return torch.autograd.grad(y, params, dy)
    return step


def _peer(port):
    """Rank 1: runs what rank 0 announces, until it announces None."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=1, world_size=WORLD)
    try:
        while True:
            job = [None]
            dist.broadcast_object_list(job, src=0)
            if job[0] is None:
                break
            variant, shape, steps = job[0]
            step = make_step(variant, shape, 1)
            dist.barrier()
            for _ in range(steps):
                step()
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    peer = multiprocessing.get_context("spawn").Process(target=_peer, args=(port,), daemon=True)
    peer.start()
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=WORLD)
    try:
        yield
    finally:
        dist.broadcast_object_list([None], src=0)
        dist.destroy_process_group()
        torch.set_num_threads(threads)
        peer.join(timeout=60)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def bench_sync(benchmark, two_ranks, shape, variant):
    steps = WARMUP + 1 + ROUNDS  # = what rank 0 runs below: warm-up, pedantic's warm-up round, rounds
    dist.broadcast_object_list([(variant, shape, steps)], src=0)
    step = make_step(variant, shape, 0)
    dist.barrier()
    for _ in range(WARMUP):
        step()
    benchmark.group = f"sync bn fwd_bwd {'x'.join(map(str, shape))} per rank, {WORLD} gloo ranks"
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    dist.barrier()
    benchmark.extra_info.update(bench="sync", impl=variant, op="fwd_bwd", shape=list(shape), world=WORLD,
                                backend="gloo", threads_per_rank=1, dtype="torch.float32")
