"""Head-parallel attention over ``torch.distributed`` (NCCL on GPUs, gloo on the CPU).

Each rank owns the heads a ``Placement`` gives it (whole GQA groups) and runs the generated
kernels for the pattern restricted to them. Two ways to use it:

* ``head_parallel_attention(q, k, v, pattern, placement)``: q/k/v with every head on every
  rank; each rank attends its own heads and the outputs are gathered back into head order
  (a building block and a test of the split).
* ``shard_attention_layers(model, placements)``: tensor-parallel attention for a model whose
  attention modules have ``q_proj/k_proj/v_proj/o_proj`` and an ``s2dsl_pattern`` (after
  ``s2dsl.integrations.hf.apply``): this rank keeps the rows of Wq/Wk/Wv and the columns of Wo
  that belong to its heads, and the partial outputs of Wo are summed by an all-reduce. The
  rest of the model (embeddings, MLPs) stays replicated, so every rank ends with the full
  hidden states. Uneven sparsity then means uneven head counts, not uneven time.

Nothing here imports transformers: the modules are recognised by their attributes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ..pattern import Pattern
from .heads import kv_heads_of, restrict
from .placement import Placement

__all__ = ["rank_heads", "head_parallel_attention", "shard_attention_layers", "HeadParallelOutput"]

Assignment = Union[Placement, Sequence[Sequence[int]]]


def _assignment(placement: Assignment) -> List[List[int]]:
    return [list(a) for a in (placement.assignment if isinstance(placement, Placement) else placement)]


def _check_partition(assignment: List[List[int]], pattern: Pattern) -> None:
    """Every head on exactly one rank: a placement made for another pattern would drop heads."""
    heads = sorted(h for a in assignment for h in a)
    if heads != list(range(pattern.heads)):
        raise ValueError(f"the placement does not split heads 0..{pattern.heads - 1} of pattern {pattern.name} "
                         f"over the ranks (each exactly once); place this pattern's heads")


def rank_heads(placement: Assignment, rank: Optional[int] = None, world_size: Optional[int] = None) -> List[int]:
    """The q heads ``rank`` owns; the placement must have one entry per rank of the group."""
    assignment = _assignment(placement)
    rank = dist.get_rank() if rank is None else rank
    world_size = dist.get_world_size() if world_size is None else world_size
    if len(assignment) != world_size:
        raise ValueError(f"the placement is for {len(assignment)} GPUs but the process group has {world_size} "
                         "ranks; place the heads with --gpus equal to the world size")
    return sorted(assignment[rank])


def head_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern,
                            placement: Assignment, *, scale: Optional[float] = None, group=None) -> torch.Tensor:
    """``s2dsl.attention`` (layout bhsd) split by heads over the ranks of ``group``.

    Every rank passes the full q (batch, heads, seq, dim) and k, v (kv_heads); each
    computes its own heads and all ranks return the full output.
    """
    from ..runtime.api import attention
    world = dist.get_world_size(group)
    assignment = _assignment(placement)
    _check_partition(assignment, pattern)
    mine = rank_heads(assignment, dist.get_rank(group), world)
    sub = restrict(pattern, mine)
    kv = list(kv_heads_of(pattern, mine))
    out = attention(q[:, mine], k[:, kv], v[:, kv], sub, scale=scale).contiguous()
    # all_gather needs equal shapes: pad to the largest head count, then scatter into place
    width = max(len(a) for a in assignment)
    padded = out.new_zeros(out.shape[0], width, *out.shape[2:])
    padded[:, :len(mine)] = out
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    full = torch.empty_like(q)
    for heads, part in zip(assignment, parts):
        full[:, sorted(heads)] = part[:, :len(heads)]
    return full


class HeadParallelOutput(torch.nn.Module):
    """The slice of an output projection for this rank's heads, then a sum over ranks.

    The bias (if any) is added on rank 0 only, so the sum carries it once.
    """

    def __init__(self, linear: torch.nn.Linear, columns: torch.Tensor, add_bias: bool, group=None):
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach()[:, columns].clone(),
                                         requires_grad=linear.weight.requires_grad)
        bias = linear.bias if (add_bias and linear.bias is not None) else None
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone())
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        if torch.is_grad_enabled() and y.requires_grad:
            from torch.distributed.nn.functional import all_reduce
            return all_reduce(y, group=self.group)
        dist.all_reduce(y, group=self.group)
        return y


def _rows(heads: Sequence[int], head_dim: int, device) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads]).to(device)


def _keep_rows(linear: torch.nn.Linear, rows: torch.Tensor) -> torch.nn.Linear:
    new = torch.nn.Linear(linear.in_features, len(rows), bias=linear.bias is not None,
                          device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(linear.weight[rows])
        if linear.bias is not None:
            new.bias.copy_(linear.bias[rows])
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


def _attention_modules(model) -> List[torch.nn.Module]:
    mods = {}
    for m in model.modules():
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "s2dsl_pattern")):
            mods.setdefault(getattr(m, "layer_idx", len(mods)), m)
    if not mods:
        raise ValueError("found no attention modules with q_proj/k_proj/v_proj/o_proj and an s2dsl pattern: "
                         "call s2dsl.integrations.hf.apply(model, plan) first")
    return [mods[i] for i in sorted(mods)]


def shard_attention_layers(model, placements: Sequence[Assignment], *, group=None):
    """Keep this rank's heads in every attention layer (tensor-parallel attention), in place.

    ``placements``: one per layer (``place(layer_pattern, world_size, seq_len)``), or one for
    every layer. Returns the model; ``model.s2dsl_patterns`` become the restricted patterns,
    so an ``S2Cache`` built afterwards holds this rank's kv heads only.
    """
    modules = _attention_modules(model)
    if len(placements) == 1:
        placements = list(placements) * len(modules)
    if len(placements) != len(modules):
        raise ValueError(f"{len(placements)} placements for {len(modules)} attention layers")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    restricted = []
    for m, placement in zip(modules, placements):
        pattern: Pattern = m.s2dsl_pattern
        _check_partition(_assignment(placement), pattern)
        mine = rank_heads(placement, rank, world)
        kv = kv_heads_of(pattern, mine)
        d = m.head_dim
        device = m.q_proj.weight.device
        m.q_proj = _keep_rows(m.q_proj, _rows(mine, d, device))
        m.k_proj = _keep_rows(m.k_proj, _rows(kv, d, device))
        m.v_proj = _keep_rows(m.v_proj, _rows(kv, d, device))
        m.o_proj = HeadParallelOutput(m.o_proj, _rows(mine, d, device), add_bias=rank == 0, group=group)
        m.s2dsl_pattern = restrict(pattern, mine)
        m.s2dsl_heads = tuple(mine)
        restricted.append(m.s2dsl_pattern)
    if hasattr(model, "s2dsl_patterns"):
        model.s2dsl_patterns = tuple(restricted)
    return model
