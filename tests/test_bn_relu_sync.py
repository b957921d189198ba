"""ConvBNReLU with SyncBatchNorm over two CPU processes (gloo, a FileStore in a temporary folder: no network)
against one process running plain BatchNorm on the concatenated batch.

The two ranks get unequal batches (2 and 3 images), which torch's SyncBatchNorm handles through per-rank
counts. Checked after three training steps: outputs and input gradients (each rank's rows), conv and BN
parameter gradients (summed over ranks: each rank's are its own batch's, as torch's SyncBatchNorm leaves them
for DDP to reduce), running statistics and num_batches_tracked (every rank). Both the Triton backend (under
the interpreter) and the eager backend (torch's SyncBatchNorm refuses CPU tensors, so eager has its own
all-reduce path) are run. Tolerance: fp32, statistics summed in a different order: 1e-5 relative.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import time

import pytest
import torch
from torch import nn

WORLD = 2
ROWS = {0: slice(0, 2), 1: slice(2, 5)}  # unequal per-rank batch sizes
STEPS = 3
CONFIGS = (("triton", "contiguous"), ("triton", "channels_last"), ("eager", "contiguous"))
TIMEOUT_S = 55.0


def _problem():
    """The block (BatchNorm2d, momentum=None to cover the cumulative average) and per-step inputs/grads."""
    from upernet_fast import ConvBNReLU

    torch.manual_seed(0)
    block = ConvBNReLU(3, 5, 3, padding=1)
    block.batch_norm.momentum = None
    with torch.no_grad():
        block.batch_norm.weight.uniform_(0.5, 1.5)
        block.batch_norm.bias.uniform_(-0.5, 0.5)
    xs = [torch.randn(5, 3, 7, 5) * 2 + 0.5 for _ in range(STEPS)]
    gs = [torch.randn(5, 5, 7, 5) for _ in range(STEPS)]
    return block, xs, gs


def _run(block, xs, gs, rows, layout):
    outputs, input_grads = [], []
    for x, g in zip(xs, gs):
        x = x[rows].clone()
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = block(x)
        y.backward(g[rows])
        outputs.append(y.detach().contiguous())
        input_grads.append(x.grad.contiguous())
    bn = block.batch_norm
    return {
        "outputs": outputs,
        "input_grads": input_grads,
        "param_grads": [p.grad.clone() for p in (block.conv.weight, bn.weight, bn.bias)],
        "buffers": [bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()],
    }


def _worker(rank: int, store_file: str, out_dir: str) -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton backend runs CPU tensors through the interpreter
    import torch.distributed as dist

    import importlib

    op_module = importlib.import_module("upernet_fast.ops.bn_relu")  # the module, not the function

    # Count entries into the Triton kernels: a silent fallback to eager would also match the reference.
    launches = []
    real_kernels = op_module._kernels
    op_module._kernels = lambda: launches.append(1) or real_kernels()
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=WORLD)
    try:
        results = {}
        for backend, layout in CONFIGS:
            block, xs, gs = _problem()
            block = nn.SyncBatchNorm.convert_sync_batchnorm(block)
            assert isinstance(block.batch_norm, nn.SyncBatchNorm)
            block.backend = backend
            launches.clear()
            results[(backend, layout)] = _run(block, xs, gs, ROWS[rank], layout)
            results[(backend, layout)]["triton_launches"] = len(launches)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_sync_batchnorm_two_processes_matches_concatenated_batch(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    store_file = str(tmp_path / "store")
    procs = [ctx.Process(target=_worker, args=(rank, store_file, str(tmp_path))) for rank in range(WORLD)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, f"the two-process run did not finish within {TIMEOUT_S} s"
    assert all(p.exitcode == 0 for p in procs), f"worker exit codes {[p.exitcode for p in procs]}"
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    # One process, plain BatchNorm2d, the whole batch: the eager reference block.
    block, xs, gs = _problem()
    want = _run(copy.deepcopy(block), xs, gs, slice(None), "contiguous")

    def close(a, b, what):
        scale = b.abs().max().clamp_min(1.0)
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")

    for config in CONFIGS:
        got = [r[config] for r in ranks]
        for step in range(STEPS):
            for key in ("outputs", "input_grads"):
                close(torch.cat([g[key][step] for g in got]), want[key][step], f"{config} step {step} {key}")
        for i, name in enumerate(("conv.weight", "bn.weight", "bn.bias")):
            close(got[0]["param_grads"][i] + got[1]["param_grads"][i], want["param_grads"][i], f"{config} {name}")
        for rank_result in got:
            for a, b, name in zip(rank_result["buffers"], want["buffers"], ("mean", "var", "count")):
                close(a, b, f"{config} running {name}")
        assert got[0]["buffers"][2].item() == STEPS
        backend = config[0]
        for rank_result in got:  # forward and backward of every step on Triton, none on eager
            assert (rank_result["triton_launches"] >= 2 * STEPS) == (backend == "triton"), (config, rank_result)
