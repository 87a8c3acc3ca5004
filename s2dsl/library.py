"""Ready-made patterns written in the .s2 language itself."""
from __future__ import annotations

from typing import Optional, Tuple, Union

from .frontend import parse
from .pattern import Pattern


def local_stride(*, block: int, local_blocks: Union[int, Tuple[int, int]], vert_stride: int, heads: int,
                 kv_heads: Optional[int] = None, num_dense_heads: int = 0,
                 head_sliding_offset: int = 0, head_sliding_step: Optional[int] = None,
                 homo_head: bool = False, causal: bool = True,
                 vert_position_type: Optional[str] = None, name: str = "local_stride") -> Pattern:
    """DKernel's (S2-Attention's) local-stride family, exactly: the mask of DKernel's
    ``get_sparse_attn_mask`` with the same arguments (``heads`` is its ``num_heads``).

    With ``vert_position_type="absolute"`` (the default when causal) kv head ``g`` keeps
    block ``j`` for block ``i`` iff ``-right < i - j < left`` or
    ``(j + g*step + head_sliding_offset) % vert_stride == 0``, where
    ``step = head_sliding_step or max(1, vert_stride // heads)`` (q heads, as DKernel
    divides) and ``local_blocks`` is ``left`` (causal: right = 1) or ``(left, right)``, each
    counting the diagonal. With ``"relative"`` (the default when bidirectional) every sparse
    head keeps ``(i, j)`` iff ``(l + r) % vert_stride == 0`` with
    ``l = max(0, i - j - left + 1)``, ``r = max(0, j - i - right + 1)``: a ``stride
    vert_stride relative`` beyond a ``window left ahead right - 1``. The q heads of a kv
    head share its pattern; the last ``num_dense_heads`` *kv* heads (all their q heads)
    are dense.
    """
    kv = heads if kv_heads is None else kv_heads
    if heads < 1 or kv <= 0 or heads % kv:
        raise ValueError(f"kv_heads={kv_heads} must divide heads={heads}")
    if not 0 <= num_dense_heads <= kv:
        raise ValueError(f"num_dense_heads={num_dense_heads} counts kv heads (as DKernel does): it must be in 0..{kv}")
    if homo_head and num_dense_heads:
        raise ValueError("homo_head=True shares one pattern between all heads, so it cannot have dense heads "
                         "(DKernel refuses this too)")
    if vert_stride < 1:
        raise ValueError(f"vert_stride={vert_stride} must be >= 1")
    if vert_position_type is None:
        vert_position_type = "absolute" if causal else "relative"
    if vert_position_type not in ("absolute", "relative"):
        raise ValueError(f"vert_position_type={vert_position_type!r} must be 'absolute' or 'relative'")
    if causal:
        if not isinstance(local_blocks, int) or local_blocks < 1:
            raise ValueError(f"local_blocks={local_blocks!r}: a causal pattern takes one int >= 1 (DKernel's rule)")
        left, right = local_blocks, 1
    elif isinstance(local_blocks, int):
        if local_blocks < 0:
            raise ValueError(f"local_blocks={local_blocks} must be >= 0")
        left = right = local_blocks
    else:
        if len(local_blocks) != 2 or not all(isinstance(x, int) and x > 0 for x in local_blocks):
            raise ValueError(f"local_blocks={local_blocks!r}: give (left, right), both >= 1 (each counts the diagonal)")
        left, right = local_blocks
    if vert_position_type == "relative" and left == 0 and right == 0:
        # DKernel's l + r counts the diagonal block twice here (l = r = 1): no window/stride reads so
        raise ValueError("local_blocks=0 with a relative stride is DKernel's degenerate case (its distances "
                         "count the diagonal on both sides); use local_blocks >= 1")
    if head_sliding_step is None:
        head_sliding_step = max(1, vert_stride // (1 if homo_head else heads))
    group = heads // kv
    sparse_q = (kv - num_dense_heads) * group
    window = f"window local_left ahead {right - 1}" if right > 1 else "window local_left"
    if left == 0 and right <= 1:
        window = ""
    if vert_position_type == "relative":
        body = f"{window}  stride vert_stride relative"
    else:
        head = "0" if homo_head else ("h" if group == 1 else f"(h // {group})")
        body = f"{window}  stride vert_stride offset {head} * step + head_sliding_offset"
    groups = []
    if sparse_q:
        groups.append(f"heads 0..{sparse_q - 1} {{ {body} }}")
    if sparse_q < heads:
        groups.append(f"heads {sparse_q}..{heads - 1} {{ dense }}")
    mode = "causal" if causal else "bidirectional"
    text = f"""
const local_left = {left}
const vert_stride = {vert_stride}
const step = {head_sliding_step}
const head_sliding_offset = {head_sliding_offset}
pattern {name} {{
    block = {block}  heads = {heads}  kv_heads = {kv}  {mode}
    {' '.join(groups)}
}}
"""
    return parse(text, f"<local_stride {name}>")[name]
