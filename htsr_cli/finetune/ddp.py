"""DDP plumbing of ``htsr finetune``: torchrun's environment, and the few collectives the
loop needs (``--nproc-per-node`` is :func:`htsr_cli.finetune.api.launch`).

Every rank holds the whole (small) data set and the same random stream; rank 0 alone computes
re-allocations and writes the run directory (docs/finetune.md, "Many processes").
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from htsr_cli.engine.distributed import dist_env  # one reading of torchrun's environment


def broadcast(obj: Any, world: int) -> Any:
    """Rank 0's ``obj`` on every rank (any picklable object)."""
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(values: list[torch.Tensor], world: int) -> list[float]:
    """Sums over the ranks of scalar tensors, as floats (float64 on the way)."""
    stacked = torch.stack([v.double() for v in values])
    if world > 1:
        import torch.distributed as dist

        if dist.get_backend() == "gloo":
            stacked = stacked.cpu()
        dist.all_reduce(stacked)
    return stacked.tolist()


def replicas_equal(model: nn.Module, world: int) -> bool:
    """Whether every rank holds exactly rank 0's weights. DDP averages gradients, so replicas
    stay equal only when every rank applied the same per-layer learning rates."""
    import torch.distributed as dist

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    same = torch.tensor([int(torch.equal(flat, ref))], device=flat.device)
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


__all__ = ["all_sum", "broadcast", "dist_env", "replicas_equal"]
