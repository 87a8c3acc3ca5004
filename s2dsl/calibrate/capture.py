"""Attention mass per (head, query block, kv block), computed chunk by chunk.

A causal LM's attention is recomputed one chunk of query rows at a time: the chunk's
scores against the keys before it, the softmax, the output rows (so the model runs on
exactly this attention) and the probabilities summed into blocks. Nothing of size
N x N per head is ever held: a chunk holds ``rows x keys`` scores, and what is kept is the
block-level mass, reduced further into recovery curves by ``RecoveryAccumulator``.

For Hugging Face models the recomputation is an attention function registered with
transformers' own ``AttentionInterface`` (``"s2dsl_calibrate"``), so no model code changes.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

__all__ = ["chunked_attention", "CAPTURE_IMPLEMENTATION", "capturing"]

CAPTURE_IMPLEMENTATION = "s2dsl_calibrate"
#: default bound on one chunk's score matrix (batch * heads * rows * keys elements, float32)
MAX_CHUNK_ELEMENTS = 1 << 26


def _chunk_rows(batch: int, heads: int, n: int, block: int, max_elements: int) -> int:
    rows = max_elements // max(1, batch * heads * n)
    return max(block, rows // block * block)


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int, *,
                      scale: Optional[float] = None, max_elements: int = MAX_CHUNK_ELEMENTS,
                      on_chunk: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Causal attention (b, h, n, d) -> (b, h, n, d), computed in chunks of query blocks.

    ``k, v`` may have fewer heads (grouped-query attention). For each chunk,
    ``on_chunk(first_query_block, mass)`` receives ``mass`` (b, h, chunk_blocks, kv_blocks):
    the probabilities summed over the chunk block's query tokens and the kv block's keys
    (float32; row sums are the number of query tokens in the block).
    """
    b, h, n, d = q.shape
    if k.shape[2] != n:
        raise ValueError(f"calibration attends a whole sequence: q has {n} positions but k has {k.shape[2]}")
    g = h // k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    nb = -(-n // block)
    rows = _chunk_rows(b, h, n, block, max_elements)
    out = torch.empty_like(q)
    pos = torch.arange(n, device=q.device)
    kv_heads = k.shape[1]
    # a kv head's g query heads share one matmul: (b, kv, g * rows, d) against its keys, so K/V
    # are neither repeated nor converted per chunk
    kf, vf = k.float(), v.float()
    for s in range(0, n, rows):
        e = min(n, s + rows)
        c = e - s
        kb = -(-e // block)  # kv blocks a causal chunk can reach
        qc = q[:, :, s:e].float().reshape(b, kv_heads, g * c, d)
        scores = torch.matmul(qc, kf[:, :, :e].transpose(-1, -2)).view(b, h, c, e) * scale
        scores.masked_fill_(pos[:e].view(1, -1) > pos[s:e].view(-1, 1), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[:, :, s:e] = torch.matmul(probs.view(b, kv_heads, g * c, e), vf[:, :, :e]).view(b, h, c, d).to(q.dtype)
        if on_chunk is not None:
            qb0, qb1 = s // block, -(-e // block)
            padded = probs.new_zeros(b, h, (qb1 - qb0) * block, kb * block)
            padded[:, :, s - qb0 * block:e - qb0 * block, :e] = probs
            mass = padded.view(b, h, qb1 - qb0, block, kb, block).sum(dim=(3, 5))
            if kb < nb:
                mass = torch.nn.functional.pad(mass, (0, nb - kb))
            on_chunk(qb0, mass)
        del scores, probs
    return out


# ------------------------------------------------------------------ transformers hook
_ACTIVE = []  # the recorder of the calibration run in progress (a stack: nesting is refused)


def _attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention-function signature; records block masses for ``_ACTIVE[-1]``."""
    if attention_mask is not None and not (attention_mask.dim() == 2 and bool(attention_mask.all())):
        raise NotImplementedError("calibration runs unpadded sequences; got an attention mask with padding")
    recorder = _ACTIVE[-1] if _ACTIVE else None
    layer = getattr(module, "layer_idx", None)
    if recorder is not None and not isinstance(layer, int):
        raise RuntimeError(f"{type(module).__name__} has no integer layer_idx: calibration needs it to tell the "
                           "layers apart")
    on_chunk = None
    if recorder is not None:
        on_chunk = lambda i, m: recorder.add(layer, i, m)  # noqa: E731
    out = chunked_attention(query, key, value, recorder.block if recorder else 64, scale=scaling,
                            max_elements=recorder.max_elements if recorder else MAX_CHUNK_ELEMENTS,
                            on_chunk=on_chunk)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(CAPTURE_IMPLEMENTATION, _attention_forward)
    AttentionMaskInterface.register(CAPTURE_IMPLEMENTATION, flash_attention_mask)


@contextlib.contextmanager
def capturing(model, recorder):
    """Run ``model`` with the calibration attention, recording into ``recorder``; restores the
    model's attention implementation afterwards."""
    if _ACTIVE:
        raise RuntimeError("a calibration run is already in progress in this process")
    register()
    previous = getattr(model.config, "_attn_implementation", None) or "eager"
    model.set_attn_implementation(CAPTURE_IMPLEMENTATION)
    _ACTIVE.append(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.pop()
        model.set_attn_implementation(previous)
