"""Several processes, one per device, on PyTorch's own engine: torch.distributed + DistributedDataParallel.

`torchrun --nproc_per_node N -m svdtrain.cli run ...` (or the `svdtrain` script under torchrun) sets RANK,
WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT; `start` joins that group (NCCL on CUDA, gloo on the CPU).
Without those variables there is one process and every method here is a no-op.

The division of work: every process trains on its share of each global batch (the batch_size images
of one step are split across processes, so a step's gradient is the same as one process's; with batch
norm, only when its statistics are those of the whole batch: `sync_bn=true`, `sync_batch_norm_`); rank 0
alone writes files and runs the stages that decide or measure (prune, export, report), and the others
wait at a barrier and read what it wrote. Several machines therefore need a run folder on a file
system they share, as resuming does.
"""

from __future__ import annotations

import functools
import gc
import os
import pickle
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as collective
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


@dataclass(frozen=True)
class Cluster:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, value):
        """Rank 0's `value` (any picklable object), on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def on_main(self, fn):
        """`fn()` on rank 0 alone; its result, or the exception it raised, on every process, so that a failure
        on rank 0 (a full disk, a bad file) stops all processes with the same error instead of leaving the
        others waiting in a collective."""
        outcome = None
        if self.main:
            try:
                outcome = (fn(), None)
            except Exception as e:  # noqa: BLE001 -- re-raised below, on every process
                outcome = (None, e)
                if self.world > 1:
                    try:
                        pickle.dumps(e)
                    except Exception:  # noqa: BLE001 -- an exception that cannot travel: send its text
                        outcome = (None, RuntimeError(str(e)))
        value, error = self.broadcast(outcome)
        if error is not None:
            raise error
        return value

    def sync_buffers(self, model: nn.Module):
        """Rank 0's buffers (batch-norm statistics) on every process: DDP copies them at the start of each
        forward, so after the last step each process holds the statistics of its own share."""
        if self.world > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)

    def sync_batch_norm_(self, model: nn.Module):
        """From now on every batch-norm layer of `model` normalises a training batch by the statistics of the
        whole global batch, over all processes, as one process would: nn.SyncBatchNorm on GPUs; on the CPU, where
        SyncBatchNorm refuses to run, `AllReduceBatchNorm`. The layers stay the same objects (only their class
        changes: parameters, buffers, state_dict keys and optimizer state are untouched); in eval mode they are
        plain batch norm. With one process, nothing changes."""
        layers = [m for m in model.modules() if isinstance(m, _BatchNorm)] if self.world > 1 else []
        for m in layers:
            if self.device.type == "cuda":
                m.__class__, m.process_group = nn.SyncBatchNorm, None
            elif not isinstance(m, AllReduceBatchNorm):
                m.__class__ = _all_reduce_class(type(m))

    def wrap(self, model: nn.Module) -> nn.Module:
        """`model` under DistributedDataParallel (which starts by copying rank 0's parameters to all)."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class AllReduceBatchNorm:
    """Mixed into a batch-norm class (`_all_reduce_class`): in training, the mean and variance are those of the
    global batch (per-channel sums all-reduced over the processes, the gradient flowing back through the
    all-reduce), so N processes with a share each compute what one process does with the whole batch. Two
    passes (sum, then sum of squared deviations) as batch norm itself computes them, in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.numel() // xf.shape[1]
        sums = collective.all_reduce(torch.cat([xf.sum(dims), xf.new_tensor([count])]))
        n, mean = sums[-1], sums[:-1] / sums[-1]
        centred = xf - mean.view(shape)
        var = collective.all_reduce(centred.square().sum(dims)) / n
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = 1 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean), momentum)
                self.running_var.lerp_((var * n / (n - 1)).to(self.running_var), momentum)  # unbiased, as BN
        return y


@functools.cache  # one class per batch-norm class
def _all_reduce_class(cls: type) -> type:
    """`cls` (BatchNorm1d / 2d / 3d, or a subclass) with AllReduceBatchNorm's training forward."""
    return type(f"AllReduce{cls.__name__}", (AllReduceBatchNorm, cls), {})


def pick_device(device: str) -> torch.device:
    """"auto": CUDA when there is a GPU; under torchrun each process takes the GPU of its LOCAL_RANK."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but torch.cuda.is_available() is False; allowed here: device=cpu or auto")
        index = int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def start(device: str = "auto") -> Cluster:
    """This process's place in the torchrun group (joining it if needed), and its device."""
    target = pick_device(device)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return Cluster(device=target)
    if not dist.is_initialized():
        # The other processes wait while rank 0 alone prunes, exports (timing layers) and reports; allow an
        # hour for that instead of NCCL's 10-minute default.
        dist.init_process_group("nccl" if target.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return Cluster(dist.get_rank(), dist.get_world_size(), target)


def stop():
    if dist.is_initialized():
        # DDP wrappers of finished stages (kept alive by reference cycles, or by an error's traceback) must go
        # while the group exists: destroyed during interpreter shutdown they abort the process (SIGABRT).
        gc.collect()
        try:
            dist.barrier()  # no process tears its connections down while another still uses them
        finally:
            dist.destroy_process_group()
