"""Padded batches: rows whose real tokens are a contiguous run inside the step's rows.

A row ``i`` of a padded (batch, heads, n, dim) tensor holds ``counts[i]`` real tokens
starting at ``offsets[i]`` (left padding: offset > 0; right padding: offset + count < n).
``padded_attention`` attends such rows over full keys by packing the real tokens of every
row into one variable-length call (the prefill kernel's ``cu_seqlens``), each row at its
own positions; the decode path over pages right-aligns them instead
(``s2dsl.runtime.decode``). Index tensors are built on the device from the per-row counts
(one asynchronous copy of 2 x batch integers), never per token on the host.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..pattern import Pattern

__all__ = ["padded_attention", "packed_rows", "right_align"]


def _to_device(values: Sequence[int], device) -> torch.Tensor:
    t = torch.tensor(list(values), dtype=torch.long)
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def packed_rows(counts: Sequence[int], offsets: Sequence[int], n: int, device):
    """(row, token) index pairs of the real tokens, packed row after row (device int64), and
    the int32 ``cu_seqlens`` of the packing."""
    total = int(sum(counts))
    cnt = _to_device(list(counts) + list(offsets), device)
    cnt, off = cnt[:len(counts)], cnt[len(counts):]
    rows = torch.repeat_interleave(torch.arange(len(counts), device=device), cnt, output_size=total)
    cu = torch.zeros(len(counts) + 1, dtype=torch.long, device=device)
    cu[1:] = torch.cumsum(cnt, 0)
    tok = torch.arange(total, device=device) - cu[rows] + off[rows]
    return rows, tok, cu.to(torch.int32)


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pattern: Pattern, *,
                     q_counts: Sequence[int], q_offsets: Sequence[int], k_counts: Sequence[int],
                     k_offsets: Sequence[int], scale: Optional[float] = None, return_lse: bool = False):
    """Attention of padded rows: q (b, heads, n, d), k/v (b, kv_heads, m, d), each row's real
    queries being its last real keys. Returns (b, heads, n, d) with pad rows zero (and the
    float32 log-sum-exp (b, heads, n), -inf on pad rows, with ``return_lse``)."""
    from .api import attention
    b, heads, n, d = q.shape
    m = k.shape[2]
    if any(m_c - qc < 0 for m_c, qc in zip(k_counts, q_counts)):
        raise ValueError("a row has more real queries than real keys")
    q_rows, q_tok, cu_q = packed_rows(q_counts, q_offsets, n, q.device)
    if (tuple(q_counts), tuple(q_offsets), n) == (tuple(k_counts), tuple(k_offsets), m):
        k_rows, k_tok, cu_k = q_rows, q_tok, cu_q
    else:
        k_rows, k_tok, cu_k = packed_rows(k_counts, k_offsets, m, q.device)

    def pack(t, rows, tok):  # one gather: (total, heads, d)
        return t.permute(0, 2, 1, 3)[rows, tok]

    out_p, lse_p = attention(pack(q, q_rows, q_tok), pack(k, k_rows, k_tok), pack(v, k_rows, k_tok), pattern,
                             scale=scale, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, return_lse=True)
    out = q.new_zeros(b, n, heads, d)
    out[q_rows, q_tok] = out_p
    out = out.transpose(1, 2)
    if not return_lse:
        return out
    lse = torch.full((b, n, heads), float("-inf"), dtype=torch.float32, device=q.device)
    lse[q_rows, q_tok] = lse_p.float().transpose(0, 1)
    return out, lse.transpose(1, 2)


def right_align(counts: Sequence[int], offsets: Sequence[int], n: int, device):
    """Moving each row's real tokens to its last ``count`` rows and back, as (b, n) int64 device
    tensors: ``src`` (aligned row -> padded row it comes from; rows before the real ones take
    any real row, their results are discarded), ``back`` (padded row -> aligned row) and
    ``real`` (padded row holds a real token)."""
    t = _to_device(list(counts) + list(offsets), device)
    cnt, off = t[:len(counts)].view(-1, 1), t[len(counts):].view(-1, 1)
    r = torch.arange(n, device=device).view(1, -1)
    src = (r - (n - cnt) + off).clamp(min=0).minimum((off + cnt - 1).clamp(min=0))
    back = (r - off + (n - cnt)).clamp(0, n - 1)
    real = (r >= off) & (r < off + cnt)
    return src, back, real
