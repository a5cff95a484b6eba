"""Unstructured magnitude pruning: zero the smallest weights of each layer, on any checkpoint.

No architecture is needed: the checkpoint is read tensor by tensor and written back as one
safetensors file in which only the pruned weights differ (bit-identical elsewhere).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping

import torch

from htsr_cli.io.checkpoint import Checkpoint, write_safetensors


def zero_smallest(weight: torch.Tensor, count: int) -> torch.Tensor:
    """A copy of ``weight`` with its ``count`` smallest-magnitude entries set to zero (ties in
    storage order, so exactly ``count`` entries are chosen, including any already zero).

    The entries are those a stable sort by magnitude puts first (NaN last), found by a
    selection (``kthvalue``) rather than a sort of every weight.
    """
    # Contiguous, so that the flat view below writes into ``out`` (a clone keeps a transposed
    # weight's strides, and reshape would then zero a copy).
    out = weight.detach().clone(memory_format=torch.contiguous_format)
    if count <= 0:
        return out
    flat = out.reshape(-1)
    if count >= flat.numel():
        flat.zero_()
        return out
    magnitude = flat.abs().to(torch.float64 if flat.dtype == torch.float64 else torch.float32)
    threshold = torch.kthvalue(magnitude, count).values
    if torch.isnan(threshold):  # sorts put NaN last: every number goes, then the first NaNs
        at = torch.isnan(magnitude)
        below = ~at
    else:
        below = magnitude < threshold
        at = magnitude == threshold
    # All entries below the threshold go; of those equal to it, the first in storage order
    # (where a stable sort leaves them) up to ``count``.
    ties = at.nonzero().squeeze(1)[: count - int(below.sum())]
    flat[below] = 0
    flat[ties] = 0
    return out


def write_pruned(
    ckpt: Checkpoint,
    path: str | os.PathLike,
    counts: Mapping[str, int],
    metadata: Mapping[str, str],
    on_tensor: Callable[[int, int, str], None] | None = None,
) -> None:
    """Copy every tensor of ``ckpt`` into one safetensors file at ``path`` (atomically), with
    ``counts[name]`` weights of layer ``name`` zeroed."""
    refs = ckpt.tensors()
    layout = [(r.key, getattr(torch, r.dtype), tuple(r.shape)) for r in refs]

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for i, ref in enumerate(refs):
            if on_tensor:
                on_tensor(i, len(refs), ref.key)
            tensor = ckpt.load(ref.key)
            name = ref.key[: -len(".weight")] if ref.key.endswith(".weight") else None
            if name is not None and counts.get(name, 0) > 0:
                tensor = zero_smallest(tensor, counts[name])
            yield ref.key, tensor
        if on_tensor:
            on_tensor(len(refs), len(refs), "")

    write_safetensors(path, tensors(), layout, metadata)


__all__ = ["zero_smallest", "write_pruned"]
