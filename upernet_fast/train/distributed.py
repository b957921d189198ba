"""Process-group set-up under torchrun, and DistributedDataParallel that also runs on CPUs with SyncBatchNorm.

torch's DDP refuses any ``nn.SyncBatchNorm`` in a CPU module, because torch's SyncBatchNorm forward only runs on
GPUs. The heads of a model converted with ``upernet_fast.convert(model, sync_bn=True)`` keep their
SyncBatchNorm modules as parameter holders only: upernet_fast's ConvBNReLU computes the batch statistics and
reduces them across processes itself, on CPU tensors too (gloo). ``DataParallel`` lifts DDP's check exactly
when every SyncBatchNorm of the module is such a holder, and keeps it otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Distributed:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), or run as one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Distributed()
    info = Distributed(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend, rank=info.rank, world_size=world)
    return info


def _sync_bn_held_by_upernet_fast(module: nn.Module) -> bool:
    from upernet_fast.ops.conv_bn_relu import ConvBNReLU

    held = {id(m.batch_norm) for m in module.modules() if isinstance(m, ConvBNReLU)}
    return all(id(m) in held for m in module.modules() if isinstance(m, nn.SyncBatchNorm))


class DataParallel(nn.parallel.DistributedDataParallel):
    """DistributedDataParallel; on CPUs it accepts SyncBatchNorm layers that upernet_fast's ConvBNReLU runs."""

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        if self.device_type == "cpu" and _sync_bn_held_by_upernet_fast(module):
            return
        super()._passing_sync_batchnorm_handle(module)
