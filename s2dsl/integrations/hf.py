"""s2dsl as an attention implementation of Hugging Face transformers, with its paged KV cache.

    import s2dsl
    from s2dsl.integrations import hf

    model = transformers.AutoModelForCausalLM.from_config(config)
    hf.apply(model, s2dsl.load("plan.s2"), model_name="my_model")   # per layer: a pattern, or dense
    cache = hf.S2Cache(model, max_length=prompt_len + new_tokens, batch_size=batch)
    out = model.generate(input_ids, max_new_tokens=new_tokens, past_key_values=cache, do_sample=False)

``apply`` registers the implementations (``register``), gives every attention module its
layer's pattern (``S2File.pattern_for_layer``; ``None`` = dense, run as a dense pattern by
the same kernels) and switches the model to ``attn_implementation="s2dsl"``.

With ``S2Cache`` the keys and values live in one ``PagedKVCache`` per layer: the first
prefill runs the prefill kernel and keeps only the pages the pattern needs, every later
step (decode, chunked prefill) runs the decode kernel on the pages, and pages the pattern
no longer needs are freed as the sequence grows. With any other cache (``DynamicCache``) or
none, "s2dsl" attends over the full keys with the prefill kernel (queries shorter than keys
are the last positions). ``"s2dsl_reference"`` is transformers' eager attention with the
pattern's dense mask, for tests.

Layers with the same pattern and pool size share one page table, so each step's page
bookkeeping is planned once (at the first such layer) and every layer only scatters its
K/V. Padded batches work with ``S2Cache`` (left padding, as ``generate`` pads, or right
padding): only real tokens enter the cache, each sequence at its own positions, so a
prompt's tokens do not depend on the batch it runs in. ``crop`` (assisted / speculative
decoding) rolls back the last decode step's tokens, and ``S2Cache(max_rollback=...)``
tokens more (default 64; eviction runs in the next step's plan and that far behind). With a ``DynamicCache`` (or none), a left-padded batch (or a right-padded
prefill) packs its real tokens into one variable-length call. Limits: no beam search
(``reorder_cache``), no dropout. transformers is imported only by the
functions here, never by ``import s2dsl``.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import List, NamedTuple, Optional, Sequence, Union

import torch

from ..pattern import Pattern
from ..runtime.kv_cache import OutOfPagesError, PagedKVCache, dense_pattern

# S2Cache and S2CacheLayer subclass transformers' classes, so they are built on first access
# (module __getattr__) and left out of __all__: a star import does not import transformers
__all__ = ["register", "apply", "layer_patterns", "attention_modules", "s2dsl_attention_forward",
           "reference_attention_forward", "pages_needed", "ATTN_IMPLEMENTATION", "REFERENCE_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "s2dsl"
REFERENCE_IMPLEMENTATION = "s2dsl_reference"
_MISSING = object()


# ------------------------------------------------------------------------------ registration
def register() -> None:
    """Register "s2dsl" and "s2dsl_reference" with transformers' attention and mask interfaces.

    Their masks are the flash-attention kind: None without padding, else the 2-D padding mask
    ("s2dsl" serves left / right padding from it; "s2dsl_reference" refuses it).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(ATTN_IMPLEMENTATION, s2dsl_attention_forward)
    AttentionInterface.register(REFERENCE_IMPLEMENTATION, reference_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, flash_attention_mask)
    AttentionMaskInterface.register(REFERENCE_IMPLEMENTATION, flash_attention_mask)


def attention_modules(model) -> List[torch.nn.Module]:
    """The model's self-attention modules, by layer index (Llama-style: ``layer_idx`` and ``head_dim``)."""
    mods = {}
    for m in model.modules():
        if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "head_dim") and hasattr(m, "config"):
            mods.setdefault(m.layer_idx, m)
    if not mods:
        raise ValueError(f"found no attention modules (with layer_idx and head_dim) in {type(model).__name__}")
    return [mods[i] for i in sorted(mods)]


def layer_patterns(model, plan, *, model_name: Optional[str] = None) -> List[Optional[Pattern]]:
    """One pattern (or None = dense) per layer from ``plan``.

    ``plan``: an ``S2File`` or a path to a .s2 file with a model plan (``model_name``, or its
    only model), a sequence with one Pattern/None per layer, or one Pattern for every layer.
    """
    from ..frontend import load
    layers = len(attention_modules(model))
    if isinstance(plan, (str, os.PathLike)):
        plan = load(plan)
    if isinstance(plan, Pattern):
        return [plan] * layers
    if hasattr(plan, "models") and hasattr(plan, "pattern_for_layer"):
        if model_name is None:
            if len(plan.models) != 1:
                raise ValueError(f"{plan.filename} has {len(plan.models)} model plans ({', '.join(plan.models)}); "
                                 "pass model_name=...")
            model_name = next(iter(plan.models))
        if model_name not in plan.models:
            raise KeyError(f"no model plan {model_name!r} in {plan.filename} (plans: {', '.join(plan.models) or 'none'})")
        n = plan.models[model_name].layers
        if n != layers:
            raise ValueError(f"model plan {model_name} has {n} layers but the model has {layers}")
        return [plan.pattern_for_layer(model_name, i) for i in range(n)]
    plan = list(plan)
    if len(plan) != layers:
        raise ValueError(f"{len(plan)} patterns for a model of {layers} layers")
    return plan


def apply(model, plan, *, model_name: Optional[str] = None, implementation: str = ATTN_IMPLEMENTATION):
    """Give each attention module of ``model`` its layer's pattern and switch to ``implementation``.

    Dense layers (None) get a dense pattern with the sparse layers' block (64 without any),
    so the same kernels and cache serve them. Returns the model.
    """
    register()
    patterns = layer_patterns(model, plan, model_name=model_name)
    modules = attention_modules(model)
    config = modules[0].config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    blocks = {p.block for p in patterns if p is not None}
    block = min(blocks) if blocks else 64
    resolved = []
    for i, (m, p) in enumerate(zip(modules, patterns)):
        if p is None:
            p = dense_pattern(heads, kv_heads, block, name=f"dense_layer{i}")
        elif (p.heads, p.kv_heads) != (heads, kv_heads):
            raise ValueError(f"layer {i}: pattern {p.name} has {p.heads} heads / {p.kv_heads} kv heads but the "
                             f"model has {heads} / {kv_heads}")
        m.s2dsl_pattern = p
        resolved.append(p)
    model.s2dsl_patterns = tuple(resolved)
    model.set_attn_implementation(implementation)
    return model


def _pattern_of(module) -> Pattern:
    p = getattr(module, "s2dsl_pattern", _MISSING)
    if p is _MISSING:
        raise RuntimeError(f"attention layer {getattr(module, 'layer_idx', '?')} has no s2dsl pattern: call "
                           "s2dsl.integrations.hf.apply(model, plan) first")
    return p


def _refuse_padding(attention_mask):
    if attention_mask is None:
        return
    if attention_mask.dim() == 2 and bool(attention_mask.all()):
        return
    raise NotImplementedError("the s2dsl_reference attention does not take padded batches (an attention mask "
                              "with zeros): give sequences of equal length (the \"s2dsl\" implementation takes them)")


def _row_padding(attention_mask, n: int):
    """Real tokens of each row among the step's last ``n`` and the first of them, from HF's
    2-D padding mask (None: no padding). Real tokens of a row must be contiguous."""
    if attention_mask is None:
        return None, None
    if attention_mask.dim() != 2:
        raise NotImplementedError("s2dsl attention takes a 2-D padding mask (register() sets the mask function); "
                                  f"got a {attention_mask.dim()}-D mask")
    rows = attention_mask[:, -n:].bool().cpu()
    counts = rows.sum(1)
    offsets = rows.to(torch.int8).argmax(1)
    span = torch.arange(n).view(1, -1)
    contiguous = rows == ((span >= offsets.view(-1, 1)) & (span < (offsets + counts).view(-1, 1)))
    if not bool(contiguous.all()):
        raise NotImplementedError("s2dsl attention takes left or right padding: the real tokens of a row must be "
                                  "contiguous within a step")
    if bool((counts == n).all()):
        return None, None
    return counts.tolist(), offsets.tolist()


# ------------------------------------------------------------------------------ attention functions
def s2dsl_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: q (b, h, n, d), k/v (b, kv_heads, m, d) -> (b, n, h, d), None."""
    from ..runtime.api import attention
    if dropout:
        raise NotImplementedError("s2dsl attention has no dropout; evaluate the model (model.eval())")
    pattern = _pattern_of(module)
    layer = getattr(key, "_s2dsl_layer", None)
    if layer is not None:  # S2Cache: key/value are this step's new tokens only
        out = layer.attend(query, key, value, scaling, attention_mask)
    elif attention_mask is not None:  # a padded batch over full keys (DynamicCache or no cache)
        return _padded_attention(query, key, value, pattern, scaling, attention_mask), None
    else:
        out = attention(query, key, value, pattern, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def _padded_attention(query, key, value, pattern, scaling, attention_mask):
    """Full keys of a padded batch: the real tokens of every row packed into one variable-length
    call (``s2dsl.runtime.padding``), each row at its own positions. Returns (batch, q_len,
    heads, dim), pad rows zero."""
    from ..runtime.api import attention
    from ..runtime.padding import padded_attention
    b, heads, n, d = query.shape
    m = key.shape[2]
    k_counts, k_offsets = _row_padding(attention_mask, m)
    if k_counts is None:
        return attention(query, key, value, pattern, scale=scaling).transpose(1, 2).contiguous()
    q_counts, q_offsets = _row_padding(attention_mask, n)
    if q_counts is None:
        q_counts, q_offsets = [n] * b, [0] * b
    if any(m - n + qo + qc != ko + kc for qo, qc, ko, kc in zip(q_offsets, q_counts, k_offsets, k_counts)):
        raise NotImplementedError("s2dsl attention over full keys takes left padding (or right padding in a "
                                  "prefill): a row's real queries must be its last real keys")
    out = padded_attention(query, key, value, pattern, q_counts=q_counts, q_offsets=q_offsets, k_counts=k_counts,
                           k_offsets=k_offsets, scale=scaling)
    return out.transpose(1, 2).contiguous()


def reference_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                                dropout: float = 0.0, **kwargs):
    """transformers' eager attention under the layer pattern's dense token mask (tests, small sizes)."""
    from transformers.models.llama.modeling_llama import eager_attention_forward
    pattern = _pattern_of(module)
    _refuse_padding(attention_mask)
    if getattr(key, "_s2dsl_layer", None) is not None:
        raise RuntimeError("s2dsl_reference attends over full keys: use it with a DynamicCache, not S2Cache")
    keep = pattern.token_mask(query.shape[2], key.shape[2]).to(query.device)
    mask = torch.zeros(keep.shape, dtype=query.dtype, device=query.device)
    mask = mask.masked_fill(~keep, torch.finfo(query.dtype).min).unsqueeze(0)
    return eager_attention_forward(module, query, key, value, mask, scaling=scaling, dropout=dropout)


# ------------------------------------------------------------------------------ the cache
def pages_needed(pattern: Pattern, max_length: int, batch_size: int, lookahead: int = 0, chunk: int = 0) -> int:
    """Pool size for ``batch_size`` sequences of up to ``max_length`` tokens under ``pattern``:
    per (sequence, kv head) the blocks the pattern keeps at that length (``lookahead`` tokens
    back, for rollback, and one block more: a decode step evicts for its first token, one behind
    its last), plus the page a step may open.

    ``chunk``: the longest step after the first prefill (chunked prefill, drafts verified in
    one step). Such a step writes every block it touches and eviction catches up only with the
    next step's plan, so at its end a sequence holds what queries from ``lookahead`` tokens
    before the step's *start* need: the keep count ``chunk`` tokens further back (a first
    prefill writes only what is kept, whatever its length)."""
    from ..runtime.paging import KeepRules, kv_efficient_heads
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 tokens, got {chunk}")
    rules = KeepRules(pattern, kv_efficient_heads(pattern), "cpu")
    per_seq = sum(rules.count_needed(max_length, lookahead + max(chunk, pattern.block))) + pattern.kv_heads
    return batch_size * per_seq


def _bytes_of(value, name: str, *args) -> int:
    """``value`` as bytes: an int as given, a callable asked with ``args``."""
    got = value(*args) if callable(value) else value
    if isinstance(got, bool) or not isinstance(got, (int, float)) or got < 0:
        raise ValueError(f"{name} must be a number of bytes >= 0 (or a callable returning one), got {got!r}")
    return int(got)


def activation_headroom(model, batch_size: int, tokens: int) -> int:
    """``runtime.split.activation_headroom`` for ``model``'s config: the device bytes a forward of
    ``batch_size`` x ``tokens`` needs beside the KV cache (see its formula)."""
    from ..runtime.split import activation_headroom as headroom
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden, heads = getattr(cfg, "hidden_size", None), getattr(cfg, "num_attention_heads", None)
    if not hidden or not heads:
        raise ValueError("gpu_pages='auto' estimates the forward's activations from the model's config "
                         "(hidden_size, num_attention_heads, ...); this model has none: pass headroom=BYTES")
    dtype = next(model.parameters()).dtype
    return headroom(batch=batch_size, tokens=tokens, hidden=hidden,
                    intermediate=getattr(cfg, "intermediate_size", None) or 4 * hidden, heads=heads,
                    kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
                    head_dim=getattr(cfg, "head_dim", None) or hidden // heads,
                    vocab=getattr(cfg, "vocab_size", None) or 1, dtype_bytes=dtype.itemsize)


def _auto_split(model, patterns, *, max_length, batch_size, max_rollback, chunk, kv_dtype, gpu_pages, host_pages,
                can_drop, free_memory, headroom, host_memory):
    """``S2Cache``'s ``gpu_pages`` / ``host_pages="auto"``: per layer the need (``pages_needed``) and
    one step's pages (``tiering.step_pages``), the budgets from the device's free memory less the
    forward's headroom and from the host's, then ``runtime.split.choose_split``."""
    from ..runtime import split, tiering
    from ..runtime.paging import KeepRules, kv_efficient_heads
    if model is None:
        raise ValueError("gpu_pages/host_pages='auto' needs the model: its device, dtype and config size the split")
    if max_length is None:
        raise ValueError("gpu_pages/host_pages='auto' sizes the cache for max_length tokens per sequence: give "
                         "max_length")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("gpu_pages/host_pages='auto' reads the model's device from its parameters; it has none")
    device, dtype = param.device, param.dtype
    elem = 1 if kv_dtype == torch.int8 else dtype.itemsize
    modules = attention_modules(model)
    dims = {getattr(m, "head_dim", None) for m in modules} - {None}
    if len(dims) != 1:
        cfg = model.config
        dims = {getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads}
    head_dim = dims.pop()
    need = [pages_needed(p, max_length, batch_size, max_rollback, chunk) for p in patterns]
    step = [tiering.step_pages(p, max_length, batch_size) for p in patterns]
    page = [split.kv_page_bytes(p.block, head_dim, elem, kv_dtype == torch.int8) for p in patterns]
    gpu_budget = gpu_source = None
    if gpu_pages is None:
        free = _bytes_of(split.device_free_bytes if free_memory is None else free_memory, "free_memory", device)
        tokens = min(chunk, max_length) if chunk else max_length
        room = activation_headroom(model, batch_size, tokens) if headroom is None else _bytes_of(headroom, "headroom")
        # each pool holds one page more than its size (the write's spare page)
        gpu_budget = free - room - sum(page)
        gpu_source = (f"free {split.format_bytes(free)} - headroom {split.format_bytes(room)}"
                      + (f" (forward of {batch_size} x {tokens} tokens)" if headroom is None else "")
                      + f" - {len(page)} spare pages")
    elif isinstance(gpu_pages, int):
        gpu_pages = [gpu_pages] * len(patterns)
    host_budget = host_source = None
    if host_pages is None:
        if host_memory is None:
            avail = split.host_available_bytes()
            allowed = int(split.HOST_FRACTION * avail)
            host_source = f"{split.HOST_FRACTION:g} x {split.format_bytes(avail)} available"
        else:
            allowed = _bytes_of(host_memory, "host_memory")
            host_source = f"host_memory {split.format_bytes(allowed)}"
        host_budget = allowed
        if can_drop:  # the hidden-state log of recompute='hidden' lives there too (per layer, sequence, token)
            width = getattr(getattr(model, "config", None), "hidden_size", None) or 0
            log = len(modules) * batch_size * max_length * width * dtype.itemsize
            host_budget -= log
            host_source += f" - hidden-state log {split.format_bytes(log)}"
    else:
        host_pages = [host_pages] * len(patterns)
    got = split.choose_split(need, step, page, gpu_budget=gpu_budget, gpu_pages=gpu_pages, host_budget=host_budget,
                             host_pages=host_pages, can_drop=can_drop, gpu_source=gpu_source or "",
                             host_source=host_source or "")
    if got.host_pages is None:
        return got
    # a tier does not spill during a first prefill: the longest prompt every layer's pool holds
    longest = max_length
    for p, g in zip(patterns, got.gpu_pages):
        rules = KeepRules(p, kv_efficient_heads(p), "cpu")
        lo, hi = 0, longest
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if batch_size * sum(rules.count_needed(mid, max_rollback)) <= g:
                lo = mid
            else:
                hi = mid - 1
        longest = lo
    return dataclasses.replace(got, prefill_tokens=longest)


class _HiddenLog:
    """One layer's attention inputs (the normed hidden states its K/V projections read) per
    sequence slot and position, in host memory (pinned beside a GPU): what a dropped page is
    recomputed from (ALISA's phase 3). Writes from the GPU go through pinned staging buffers
    without a sync; they land in the log at the next read (after the step's own sync)."""

    def __init__(self, slots: int, capacity: int, hidden: int, dtype: torch.dtype, device: torch.device):
        self.cuda = device.type == "cuda"
        self.data = torch.zeros(slots, max(capacity, 1), hidden, dtype=dtype, pin_memory=self.cuda)
        self.pending = []

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def _grow(self, slots: int, capacity: int) -> None:
        s, c, h = self.data.shape
        if slots <= s and capacity <= c:
            return
        self._flush()
        grown = torch.zeros(max(slots, s), max(capacity, 2 * c), h, dtype=self.data.dtype, pin_memory=self.cuda)
        grown[:s, :c] = self.data
        self.data = grown

    def write(self, x: torch.Tensor, slots: Sequence[int], plan) -> None:
        """Log the step's real tokens of ``x`` (batch, n, hidden) at their positions (``slots``:
        each row's sequence slot, known on the host; ``plan``: the step's ``StepPlan`` with its
        host-side starts, counts and offsets)."""
        b, n, h = x.shape
        self._grow(max(slots) + 1, max(s + c for s, c in zip(plan.starts, plan.counts)))
        cap = self.data.shape[1]
        if n == 1 and all(c == 1 for c in plan.counts):  # a decode step: one row per sequence
            dst = torch.tensor([sl * cap + st for sl, st in zip(slots, plan.starts)])
        else:
            dst = torch.cat([torch.arange(st, st + c) + sl * cap for sl, st, c in zip(slots, plan.starts, plan.counts)])
        rows = x.detach().reshape(b * n, h)
        if any(c != n for c in plan.counts):  # padding: only the real tokens (an index list to the device)
            src = torch.cat([torch.arange(o, o + c) + i * n for i, (o, c) in enumerate(zip(plan.offsets, plan.counts))])
            rows = rows.index_select(0, src.to(x.device))
        if self.cuda:
            staging = torch.empty(rows.shape, dtype=self.data.dtype, pin_memory=True)
            staging.copy_(rows, non_blocking=True)
            self.pending.append((staging, dst, torch.cuda.Event()))
            self.pending[-1][2].record()
        else:
            self.data.view(-1, h).index_copy_(0, dst, rows.to(self.data.dtype))

    def _flush(self) -> None:
        h = self.data.shape[2]
        for staging, dst, ev in self.pending:
            ev.synchronize()
            self.data.view(-1, h).index_copy_(0, dst, staging)
        self.pending.clear()

    def read(self, slots: torch.Tensor, blocks: torch.Tensor, block: int, device) -> torch.Tensor:
        """The logged inputs of pages (slot, block): (m, block, hidden) on ``device`` (zeros past
        what was logged)."""
        self._flush()
        s, cap, h = self.data.shape
        pos = blocks.view(-1, 1) * block + torch.arange(block).view(1, -1)
        idx = slots.view(-1, 1) * cap + pos.clamp(max=cap - 1)
        rows = self.data.view(-1, h)[idx.view(-1)].view(-1, block, h)
        rows = torch.where((pos < cap).unsqueeze(-1), rows, 0)
        return rows.to(device, non_blocking=False)


class _LogStep(NamedTuple):
    """The host side of a one-token graph step, as ``_HiddenLog.write`` reads a ``StepPlan``."""

    starts: tuple
    counts: tuple
    offsets: tuple


def _rotary_of(model):
    """The model's rotary embedding module (Llama-style ``rotary_emb``), or None."""
    for name, m in model.named_modules():
        if name.split(".")[-1] == "rotary_emb":
            return m
    return None


def _kv_recompute(module, rotary, log: _HiddenLog, block: int, device):
    """The K/V of pages (slot, kv head, block) made again from the layer's logged inputs with the
    layer's own projections, key norm (if any) and rotary embedding at the tokens' positions
    (each sequence's own index: generate()'s positions, left padding included)."""
    import sys
    rope = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb")
    d = module.head_dim

    def recompute(slots: torch.Tensor, kv_heads: torch.Tensor, blocks: torch.Tensor):
        key = slots * (1 << 32) + blocks
        uniq, inv = torch.unique(key, return_inverse=True)  # pages of one (slot, block): one product
        us, ub = uniq // (1 << 32), uniq % (1 << 32)
        with torch.no_grad():
            x = log.read(us, ub, block, device)
            u = x.shape[0]
            k = module.k_proj(x).view(u, block, -1, d)
            v = module.v_proj(x).view(u, block, -1, d).transpose(1, 2)
            if getattr(module, "k_norm", None) is not None:
                k = module.k_norm(k)
            k = k.transpose(1, 2)
            pos = (ub.view(-1, 1) * block + torch.arange(block).view(1, -1)).to(device)
            cos, sin = rotary(x, pos)
            _, k = rope(k, k, cos, sin)
            g = kv_heads.to(device)
            inv = inv.to(device)
            return k[inv, g], v[inv, g]
    return recompute


def _capture_hidden(module, args, kwargs):
    """Forward pre-hook of an attention module: hand its input to the S2Cache layer that logs it."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    layers = getattr(cache, "layers", None)
    if not layers or not getattr(cache, "_logs_hidden", False):
        return
    x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
    layers[module.layer_idx]._hidden_in = x


_CLASSES = {}


def _classes():
    """Build the transformers subclasses on first use (transformers is imported only then)."""
    if _CLASSES:
        return _CLASSES
    from transformers.cache_utils import Cache, CacheLayerMixin

    class _Group:
        """Layers of one pattern and pool size: one page table, one set of sequences."""

        def __init__(self, size: int):
            self.size = size
            self.table = None
            self.seq_ids: tuple = ()
            self.length = 0          # tokens per row, padding included (HF's view)
            self.max_length = None   # what the cache was sized for: the tables are made that wide
            self.mask = self.padding = None

    class S2CacheLayer(CacheLayerMixin):
        """One layer of ``S2Cache``: a ``PagedKVCache`` with one sequence per batch row."""

        is_compileable = False
        is_sliding = False
        is_croppable = True

        def __init__(self, pattern: Pattern, num_pages: int, group=None, lookahead: int = 0, kv_dtype=None,
                     host_pages: Optional[int] = None, recompute=None):
            super().__init__()
            self.pattern, self.num_pages, self.lookahead = pattern, num_pages, lookahead
            self.kv_dtype, self.host_pages = kv_dtype, host_pages
            # phase 3: (attention module, rotary embedding, capacity) to recompute dropped pages from
            self.recompute = recompute
            self.hidden_log: Optional[_HiddenLog] = None
            self._static_hidden: Optional[torch.Tensor] = None  # a graph step's input, logged after it
            self.tier_group = None
            self.drop_mode, self.drop_policy = "budget", None  # S2Cache sets them (drop=, costs=)
            self._hidden_in = None
            self.group = group if group is not None else _Group(1)
            self.paged: Optional[PagedKVCache] = None
            self._length = 0
            self._pending = 0
            self.graph_step = False  # inside S2Cache.decode_graph's step (positions given)
            self.siblings = (self,)  # every layer of the cache (S2Cache sets it): a refused step rolls them back
            from ..runtime.graphs import opaque_handle
            self._opaque = opaque_handle(self._attend_opaque)  # how a compiled graph calls this layer's step

        def __deepcopy__(self, memo):
            # a compiled graph reaches a layer through its handle (an int it holds as a constant):
            # a copy (transformers' way to reuse a prompt's cache) registers its own, or a compiled
            # step over the copy would write into this layer's cache
            from ..runtime.graphs import opaque_handle
            new = self.__class__.__new__(self.__class__)
            memo[id(self)] = new
            for name, value in self.__dict__.items():
                setattr(new, name, copy.deepcopy(value, memo))
            new._opaque = opaque_handle(new._attend_opaque)
            return new

        @property
        def seq_ids(self) -> tuple:
            return self.group.seq_ids

        def lazy_initialization(self, key_states, value_states):
            b, _, _, d = key_states.shape
            self.dtype, self.device = key_states.dtype, key_states.device
            group = self.group
            self.paged = PagedKVCache(self.pattern, num_pages=self.num_pages, head_dim=d, dtype=key_states.dtype,
                                      device=key_states.device, max_seqs=b, lookahead=self.lookahead,
                                      table=group.table, kv_dtype=self.kv_dtype)
            if group.table is None:
                group.table = self.paged.table
                # the other layers join as they start: plan once per step; evict in the next plan,
                # so that the last step can be cropped (assisted decoding)
                group.table.defer_eviction = True
                if group.max_length:  # wide enough from the start: no table copy (or recompile) mid-generation
                    group.table.reserve(slots=b, max_length=group.max_length)
                group.seq_ids = tuple(self.paged.add_sequence() for _ in range(b))
                if self.host_pages is not None:
                    from ..runtime.host_tier import HostTier
                    HostTier(group.table, self.host_pages, drop=self.drop_mode if self.recompute is not None else False,
                             policy=self.drop_policy if self.recompute is not None else None, group=self.tier_group)
            if group.table.tier is not None:
                fn = None
                if self.recompute is not None:
                    module, rotary, capacity = self.recompute
                    x = self._hidden_in
                    if x is None:
                        raise RuntimeError("S2Cache(recompute='hidden'): the layer's input was not captured (an "
                                           "attention module without the hook S2Cache installs)")
                    self.hidden_log = _HiddenLog(b, capacity, x.shape[-1], x.dtype, key_states.device)
                    fn = _kv_recompute(module, rotary, self.hidden_log, self.pattern.block, key_states.device)
                group.table.tier.attach(self.paged, recompute=fn)
            self.is_initialized = True

        # A step keeps host state (each sequence's length, how far eviction has gone, the plan
        # the layers of a step share) that a traced graph would freeze. Under torch.compile the
        # update only tags the keys (traced, no break) and the attention is one opaque custom op
        # (``runtime.graphs.opaque_attention``) that runs ``_attend`` eagerly: the rest of the
        # layer compiles into one graph around it. A layer that logs its input for recompute, or
        # one not yet started, takes the disabled eager functions instead (a graph break at each).
        # The step as a CUDA graph is ``S2Cache.decode_graph``.
        def update(self, key_states, value_states, *args, **kwargs):
            # the disabled wrapper (dynamo's frame switch) costs an eager step a few microseconds a
            # layer: taken only when dynamo traces this call
            if torch.compiler.is_compiling():
                if self.is_initialized and self.recompute is None:
                    if key_states.shape[0] != len(self.seq_ids):
                        raise ValueError(f"S2Cache holds {len(self.seq_ids)} sequences; got a batch of "
                                         f"{key_states.shape[0]}")
                    key = key_states.view(key_states.shape)
                    key._s2dsl_layer = self
                    return key, value_states
                return self._update_eager(key_states, value_states)
            return self._update(key_states, value_states)

        def _update(self, key_states, value_states):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            if self._pending:
                raise RuntimeError("S2Cache: the previous keys of this layer never reached s2dsl attention; "
                                   "S2Cache needs attn_implementation='s2dsl' (s2dsl.integrations.hf.apply)")
            if key_states.shape[0] != len(self.seq_ids):
                raise ValueError(f"S2Cache holds {len(self.seq_ids)} sequences; got a batch of {key_states.shape[0]}")
            self._pending = key_states.shape[2]
            key = key_states.view(key_states.shape)  # a new tensor object that carries the way back here
            key._s2dsl_layer = self
            return key, value_states

        def attend(self, query, key, value, scale, attention_mask=None):
            if torch.compiler.is_compiling():
                if self.recompute is None:
                    from ..runtime.graphs import opaque_attention
                    return opaque_attention(query, key, value, attention_mask, self._opaque,
                                            None if scale is None else float(scale))
                return self._attend_eager(query, key, value, scale, attention_mask)
            return self._attend(query, key, value, scale, attention_mask)

        def _attend_opaque(self, query, key, value, scale, attention_mask):
            return self._attend(query, key, value, scale, attention_mask)

        def _attend(self, query, key, value, scale, attention_mask=None):
            from ..runtime.decode import cached_attention
            n = query.shape[2]
            group = self.group
            if attention_mask is None:
                lengths = left = None
            else:  # read the padding once per forward, for every layer
                if group.mask is None or group.mask[0] is not attention_mask or group.mask[1] != n:
                    group.mask, group.padding = (attention_mask, n), _row_padding(attention_mask, n)
                lengths, left = group.padding
            self._pending = 0
            # the kernel writes (b, n, heads, d) memory, so the caller's transpose back is free
            b, heads, _, d = query.shape
            buf = query.new_empty(b, n, heads, d).transpose(1, 2)
            try:
                out = cached_attention(self.paged, self.seq_ids, query, key, value, scale=scale, lengths=lengths,
                                       left_padding=left, out=buf)
            except OutOfPagesError as exc:
                self._undo_step(n)
                if n == 1 or not group.length:
                    raise
                raise OutOfPagesError(f"{exc}. A step of {n} tokens after the first prefill (a prompt chunk) holds "
                                      "every block it writes until the next step evicts: make the cache with "
                                      f"S2Cache(..., prefill_chunk_size={n}) (or generate(prefill_chunk_size=...) "
                                      "on the model's generation config)") from None
            if self.hidden_log is not None:  # phase 3: what this step's pages are recomputed from
                table = self.paged.table
                if table.in_static_step:  # a graph step: the host logs this buffer after the step
                    x = self._hidden_in[:, -1]
                    if self._static_hidden is None or self._static_hidden.shape != x.shape:
                        self._static_hidden = torch.empty_like(x)  # the first (eager) static step makes it
                    self._static_hidden.copy_(x)
                else:
                    self.hidden_log.write(self._hidden_in, [table.get(s).slot for s in self.seq_ids], table.plan)
            self._hidden_in = None
            self._length += n
            group.length = max(group.length, self._length)
            return out

        def _undo_step(self, n: int) -> None:
            """This layer's plan was refused (nothing of its group changed): roll back the layers of
            other groups that already ran this step, so that the whole cache is as before it."""
            self._pending = 0
            done = {id(self.group)}
            for layer in self.siblings:
                g = layer.group
                if layer._length != self._length + n or layer.paged is None:
                    continue
                layer._length -= n
                if id(g) in done:
                    continue
                done.add(id(g))
                plan, table = g.table.plan, g.table
                if plan is not None and plan.only_needed:  # a first prefill: the sequences start afresh
                    for s in g.seq_ids:
                        table.remove_sequence(s)
                    g.seq_ids = tuple(table.add_sequence() for _ in g.seq_ids)
                elif plan is not None:
                    for s, c in zip(g.seq_ids, plan.counts):
                        table.crop(s, table.get(s).length - c)
                g.length = self._length

        _update_eager = torch.compiler.disable(_update)
        _attend_eager = torch.compiler.disable(_attend)

        def get_seq_length(self) -> int:
            if self.graph_step and torch.compiler.is_compiling():
                # a graph step passes its positions and its attention reads lengths on the device: a
                # traced length would be a constant that recompiles the step for every token
                return 0
            return self._length + self._pending

        def get_mask_sizes(self, query_length: int):
            return self.get_seq_length() + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            group = self.group
            if self.paged is not None and group.length:
                for s in group.seq_ids:
                    self.paged.remove_sequence(s)
                group.seq_ids = tuple(self.paged.add_sequence() for _ in group.seq_ids)
                group.length = 0
            group.mask = group.padding = None
            self._length = self._pending = 0

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"S2Cache.crop takes the number of tokens to remove as a negative int, got "
                                 f"{tokens_to_remove}")
            new = self._length + tokens_to_remove  # generated tokens are real in every row: r per sequence
            if tokens_to_remove == 0 or self.paged is None:
                return
            if new < 0:
                raise ValueError(f"cannot remove {-tokens_to_remove} tokens from a cache of {self._length}")
            group = self.group
            if group.length > new:
                r = group.length - new
                for s in group.seq_ids:
                    self.paged.crop(s, self.paged.seq_len(s) - r)
                group.length = new
            self._length = new

        def reorder_cache(self, beam_idx) -> None:
            if torch.equal(beam_idx.cpu(), torch.arange(len(self.seq_ids))):
                return
            raise NotImplementedError("S2Cache does not reorder sequences (beam search)")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("S2Cache does not repeat sequences")

        def batch_select_indices(self, indices) -> None:
            raise NotImplementedError("S2Cache does not select sequences")

    class S2Cache(Cache):
        """transformers ``Cache`` over s2dsl's paged KV caches, one per layer (see the module docstring).

        ``model`` must have been through ``apply`` (its patterns per layer), or pass
        ``patterns`` (one Pattern per layer). Pool size per layer: ``num_pages`` (an int or
        one per layer), else enough for ``batch_size`` sequences of ``max_length`` tokens
        under the layer's pattern (``pages_needed``). ``crop`` can drop the tokens of the last
        decode step (assisted decoding verifies its drafts in one step) and ``max_rollback``
        tokens more (eviction runs that far behind the sequences' ends), which is what the
        first step of assisted decoding, a prefill with drafts, needs: at least the number of
        draft tokens (transformers' default: 20). ``prefill_chunk_size``: the longest step after
        the first prefill (a prompt fed in chunks; default: the model's
        ``generation_config.prefill_chunk_size``, else 0): such a step holds every block it
        writes until the next step evicts, so the pools are sized for it (``pages_needed``); a
        longer one may raise ``OutOfPagesError``. ``kv_dtype=torch.int8``: pages hold INT8 codes
        (ALISA's channel-wise asymmetric quantisation, ``s2dsl.runtime.quant``).
        ``gpu_pages`` (per layer, an int or one per layer; in place of ``num_pages``) bounds the
        GPU pool and ``host_pages`` (per layer) adds ALISA's host tier (``s2dsl.runtime.host_tier``):
        pages a step does not read wait in pinned host memory; each layer then has its own page
        table (a step reads its own layer's top-k only). ``recompute="hidden"`` (with
        ``host_pages``, 0 allowed) adds ALISA's phase 3: past the host budget the oldest pages are
        dropped, and each layer logs its attention input (the normed hidden states its K/V
        projections read) in host memory to recompute a dropped page when a step reads it again
        (Llama-style attention: ``k_proj``, ``v_proj``, optional ``k_norm``, the model's
        ``rotary_emb`` at each token's index in its sequence). ``drop`` (with ``recompute``):
        ``"cost"`` (the default) drops where ALISA's cost model says (``tiering.DropPolicy``:
        before the host budget is full when recomputing a page costs less than fetching it,
        re-planned per batch and length bucket), ``"budget"`` (or True) only past ``host_pages``;
        dropping is off without ``recompute`` (``drop=False`` says the same, and contradicts
        ``recompute``).
        ``costs``: the ``tiering.MachineCosts`` it plans with (default: measured once on the GPU,
        the model's defaults on the CPU; the recompute fitted through the first layer's own
        recompute path unless given). ``debug_report()`` says where the pages are and the
        decision in force.

        ``gpu_pages="auto"`` (needs ``model`` and ``max_length``; ``host_pages`` then defaults to
        ``"auto"`` too): the library chooses the split (``runtime.split.choose_split``, ALISA's
        phases at ``max_length``). The GPU budget is ``free_memory - headroom``: ``free_memory``
        (bytes, or a callable of the device; default: read from the CUDA device, refused where it
        cannot be read) less ``headroom`` (bytes; default ``activation_headroom``: the model's
        activations for a forward of ``batch_size`` x ``prefill_chunk_size`` tokens, or
        ``max_length`` without chunking, see ``runtime.split.activation_headroom``). If every
        layer's need (``pages_needed``) fits, phase 1: the plain cache, no host tier. Otherwise
        each layer keeps one decode step's pages (``tiering.step_pages``; refused below) and the
        rest of the budget is shared in proportion to what each would spill; the host takes the
        rest within ``host_memory`` (bytes or a callable; default half the host's available memory,
        less the hidden-state log with ``recompute``): phase 2, else, with ``recompute``, phase 3
        with the host pages scaled to the budget (and refused without). ``host_pages="auto"``
        with a given ``gpu_pages`` sizes only the host. The cost model still chooses the drop
        point. ``split`` holds the choice; ``debug_report()`` opens with it.
        """

        def __init__(self, model=None, *, max_length: Optional[int] = None, batch_size: int = 1,
                     num_pages: Union[int, Sequence[int], None] = None, patterns: Optional[Sequence[Pattern]] = None,
                     max_rollback: int = 64, kv_dtype: Optional[torch.dtype] = None,
                     gpu_pages: Union[int, Sequence[int], str, None] = None, host_pages: Union[int, str, None] = None,
                     recompute: Optional[str] = None, prefill_chunk_size: Optional[int] = None,
                     drop: Union[str, bool, None] = None, costs=None, free_memory=None, headroom: Optional[int] = None,
                     host_memory=None):
            if patterns is None:
                patterns = getattr(model, "s2dsl_patterns", None)
                if patterns is None:
                    raise ValueError("S2Cache needs a model prepared by s2dsl.integrations.hf.apply, or patterns=...")
            patterns = list(patterns)
            for name, v in (("gpu_pages", gpu_pages), ("host_pages", host_pages)):
                if isinstance(v, str) and v != "auto":
                    raise ValueError(f"{name} must be a number of pages per layer or 'auto' (chosen from the "
                                     f"machine's memory), got {v!r}")
            auto_gpu, auto_host = gpu_pages == "auto", host_pages == "auto"
            if auto_gpu and host_pages is None:  # the library chooses the split: the host's share included
                host_pages, auto_host = "auto", True
            if not auto_gpu and (free_memory is not None or headroom is not None):
                raise ValueError("free_memory and headroom size gpu_pages='auto'; with a given pool they do nothing")
            if not auto_host and host_memory is not None:
                raise ValueError("host_memory sizes host_pages='auto'; with given host_pages it does nothing")
            if gpu_pages is not None:
                if num_pages is not None:
                    raise ValueError("give gpu_pages or num_pages (the same pool size), not both")
                num_pages = gpu_pages
            elif host_pages is not None:
                raise ValueError("host_pages needs gpu_pages: the GPU pool the host tier backs")
            if not auto_host and host_pages is not None and host_pages < 0:
                raise ValueError(f"host_pages must be >= 0, got {host_pages}")
            rec = [None] * len(patterns)
            from ..runtime import tiering
            off = "leave out recompute= (an S2Cache drops only with recompute='hidden')"
            mode = tiering.drop_mode("cost" if drop is None else drop, off=off)
            if mode is not None and drop is not None and recompute is None:
                raise ValueError(f"drop={drop!r} chooses when pages are dropped; dropping needs recompute='hidden' "
                                 "(what a dropped page is made again from). To keep every page, leave out drop "
                                 "(or pass drop=False)")
            if mode is None and recompute is not None:
                raise ValueError(f"drop={drop!r} turns dropping off, but recompute={recompute!r} is there to drop "
                                 "pages (ALISA's phase 3): to turn dropping off leave out recompute (a full host "
                                 "then raises HostFullError); to drop only past host_pages pass drop='budget'")
            drop = mode or "cost"
            if costs is not None and not isinstance(costs, tiering.MachineCosts):
                raise TypeError(f"costs must be a tiering.MachineCosts, got {type(costs).__name__}")
            self.costs = costs
            if recompute is not None:
                rec = self._recompute_sources(model, recompute, host_pages, max_length, len(patterns))
            if prefill_chunk_size is None:  # generate(prefill_chunk_size=...) feeds the prompt in such chunks
                config = getattr(model, "generation_config", None)
                prefill_chunk_size = getattr(config, "prefill_chunk_size", None) or 0
            if prefill_chunk_size < 0:
                raise ValueError(f"prefill_chunk_size must be >= 0 tokens, got {prefill_chunk_size}")
            self.prefill_chunk_size = prefill_chunk_size
            if kv_dtype is not None and kv_dtype != torch.int8 and not kv_dtype.is_floating_point:
                raise ValueError(f"kv_dtype must be torch.int8 or a floating-point dtype; got {kv_dtype}")
            self.split = None
            if auto_gpu or auto_host:
                self.split = _auto_split(model, patterns, max_length=max_length, batch_size=batch_size,
                                         max_rollback=max_rollback, chunk=prefill_chunk_size, kv_dtype=kv_dtype,
                                         gpu_pages=None if auto_gpu else num_pages,
                                         host_pages=None if auto_host else host_pages,
                                         can_drop=recompute is not None, free_memory=free_memory,
                                         headroom=headroom, host_memory=host_memory)
                num_pages = list(self.split.gpu_pages)
                host_pages = None if self.split.host_pages is None else list(self.split.host_pages)
                if host_pages is None:  # phase 1: nothing leaves the GPU, nothing to recompute
                    recompute, rec = None, [None] * len(patterns)
            if num_pages is None:
                if max_length is None:
                    raise ValueError("give max_length (tokens per sequence) or num_pages to size the page pools")
                num_pages = [pages_needed(p, max_length, batch_size, max_rollback, prefill_chunk_size)
                             for p in patterns]
            elif isinstance(num_pages, int):
                num_pages = [num_pages] * len(patterns)
            num_pages = list(num_pages)
            if len(num_pages) != len(patterns):
                raise ValueError(f"{len(num_pages)} pool sizes for {len(patterns)} layers")
            tiered = host_pages is not None
            host_per_layer = (host_pages if isinstance(host_pages, list) else [host_pages] * len(patterns)) \
                if tiered else [None] * len(patterns)
            # with a host tier every layer has its own page table: a layer's step reads its own top-k
            # selection, and a table shared by L layers would have to keep the union of L selections
            # on the GPU (the tiers still prepare a step together: runtime.host_tier.TierGroup)
            keys = [(p.fingerprint(), n, i if tiered else None)
                    for i, (p, n) in enumerate(zip(patterns, num_pages))]
            groups = {key: _Group(keys.count(key)) for key in keys}
            for g in groups.values():
                g.max_length = max_length
            super().__init__(layers=[S2CacheLayer(p, n, groups[key], max_rollback, kv_dtype, h, r)
                                     for p, n, key, h, r in zip(patterns, num_pages, keys, host_per_layer, rec)])
            for layer in self.layers:
                layer.siblings = tuple(self.layers)
            if tiered:
                from ..runtime.host_tier import TierGroup
                tiers = TierGroup()
                for layer in self.layers:
                    layer.tier_group = tiers
            self._logs_hidden = recompute is not None
            self.max_length = max_length
            self._hidden = getattr(getattr(model, "config", None), "hidden_size", None)
            self.drop_policy = None
            if recompute is not None:  # one policy for every layer's tier: the layers share its plans
                self.drop_policy = tiering.DropPolicy(costs, hidden=self._hidden, fit=self._first_fit)
                for layer in self.layers:
                    layer.drop_mode = drop
                    layer.drop_policy = self.drop_policy if drop == "cost" else None

        def _first_fit(self):
            first = next((layer for layer in self.layers if layer.paged is not None), None)
            return self._fit_recompute(first) if first is not None else None

        @staticmethod
        def _recompute_sources(model, recompute, host_pages, max_length, n_layers):
            """Per layer (attention module, rotary embedding, log capacity); installs the hooks that
            hand each attention module's input to its layer."""
            if recompute == "ids":
                raise ValueError("recompute='ids' is not built: a dropped token's K/V at layer L depend on "
                                 "every earlier token through layers 0..L-1, so recomputing from token ids "
                                 "re-runs the dropped prefix's prefill per miss; use recompute='hidden'")
            if recompute != "hidden":
                raise ValueError(f"recompute must be None or 'hidden' (the layer's input hidden states), got "
                                 f"{recompute!r}")
            if host_pages is None:
                raise ValueError("recompute='hidden' drops pages past the host budget: give host_pages (0: drop "
                                 "whatever leaves the GPU pool)")
            if model is None:
                raise ValueError("recompute='hidden' needs the model (its K/V projections and rotary embedding)")
            modules = attention_modules(model)
            if len(modules) != n_layers:
                raise ValueError(f"{n_layers} layer patterns for a model of {len(modules)} attention layers")
            rotary = _rotary_of(model)
            if rotary is None or not all(hasattr(m, "k_proj") and hasattr(m, "v_proj") for m in modules):
                raise ValueError("recompute='hidden' runs Llama-style attention (k_proj, v_proj and a rotary_emb "
                                 f"module); {type(model).__name__} is not")
            for m in modules:
                if not getattr(m, "_s2dsl_hidden_hook", False):
                    m.register_forward_pre_hook(_capture_hidden, with_kwargs=True)
                    m._s2dsl_hidden_hook = True
            return [(m, rotary, max_length or 0) for m in modules]

        @property
        def paged(self) -> List[Optional[PagedKVCache]]:
            """The per-layer ``PagedKVCache`` (None before the first forward)."""
            return [layer.paged for layer in self.layers]

        def memory_bytes(self) -> int:
            """K/V bytes of the pages in use, all layers."""
            return sum(p.memory_bytes() for p in self.paged if p is not None)

        def decode_graph(self, model, *, max_length: Optional[int] = None, capture: bool = True,
                         compile: Union[bool, str] = False, tune_splits: bool = False):
            """A one-token decode step of ``model`` over this cache as a CUDA graph (after the prefill).

            Returns ``step(input_ids) -> logits``: ``input_ids`` (batch, 1), one new token per
            sequence; positions are each sequence's own length (left padding needs no mask). The
            first call runs eagerly, the second captures the step, later calls replay it: page
            bookkeeping, K/V writes and attention all run on the device with static shapes.
            ``max_length``: the longest a sequence may grow (default: the length the cache was
            sized for). ``capture=False`` runs the same static step eagerly (CPU, debugging).
            Logits returned by a replay are overwritten by the next call. With a host tier
            (``gpu_pages``/``host_pages``) the tier moves, drops and recomputes pages in the
            host part before each step, in place, and the graph step reads them; a layer that
            logs its input for recompute (``recompute="hidden"``) copies it into a buffer inside
            the step, which the host logs after it.

            ``compile=True`` (or a ``torch.compile`` backend name) captures the model's forward
            compiled by ``torch.compile``: one graph, each layer's cache update + attention an
            opaque op in it (``s2dsl::opaque_attention``, eager inside), so that the small kernels
            around attention (norms, rotary embedding, activations, residual adds), which a CUDA
            graph replays one by one, are fused; each page table's plan of the step (positions,
            eviction, the new token's page) is compiled too (``PageTable.compile_static``). The
            first call compiles (seconds to a minute for a large model), the first three run
            eagerly, the fourth captures.

            ``tune_splits=True``: each layer's decode kernel times its candidate split counts (a
            quarter to double the policy's, powers of two, ``decode.split_candidates``) on
            scratch outputs at the first eager step, and the graph captures the fastest (a few
            dozen extra launches per layer, once). It stays on for this cache's later decode
            calls of new shapes. Ignored off CUDA (the CPU has no split).
            """
            from ..runtime.graphs import DecodeGraph
            if tune_splits:
                from ..runtime.decode import enable_split_tuning
                for layer in self.layers:
                    if layer.paged is not None:
                        enable_split_tuning(layer.paged)
            layers = list(self.layers)
            if any(layer.paged is None for layer in layers):
                raise RuntimeError("decode_graph needs the cache filled by a prefill first")
            max_length = max_length or self.max_length
            if max_length is None:
                raise ValueError("give max_length: the longest a sequence may grow")
            groups = list({id(layer.group): layer.group for layer in layers}.values())
            tables = [g.table for g in groups]
            first = layers[0]
            batch = len(first.seq_ids)
            device = first.paged.device
            ids_buf = torch.zeros(batch, 1, dtype=torch.long, device=device)
            slots = first.paged.table.slots_tensor(first.paged.table.seqs(first.seq_ids)).to(torch.long)
            # the step's positions: each sequence's own length, read on the device
            pos_of = first.paged.table

            forward = model
            if compile:
                backend = compile if isinstance(compile, str) else "inductor"
                forward = torch.compile(model, dynamic=False, backend=backend)
            # each layer's frames after the cache's graph breaks are compiled per layer index
            limit = max(torch._dynamo.config.recompile_limit, 2 * len(layers) + 8)

            def step():
                positions = pos_of.lens[slots].to(torch.long).view(batch, 1)
                for layer in layers:
                    layer.graph_step = True
                try:
                    with torch._dynamo.config.patch(recompile_limit=limit):
                        return forward(input_ids=ids_buf, position_ids=positions, past_key_values=self,
                                       use_cache=True).logits
                finally:
                    for layer in layers:
                        layer.graph_step = False

            # compiled: three eager steps, so that nothing is left to compile while the graph is captured
            # (the page tables' compiled plans recompile once at the second step on the CPU: their
            # first call comes from inside the model's first compiled call)
            graph = DecodeGraph(step, tables, [g.seq_ids for g in groups], max_length=max_length, capture=capture,
                                warmup=3 if compile else 1)
            if compile:  # each table's plan of the step: its few dozen small ops as a few fused kernels
                for t in tables:
                    if t.tier is None:  # a tier's table plans around its own host state: left eager
                        t.compile_static(backend)

            logged = [layer for layer in layers if layer.hidden_log is not None]

            def run(input_ids):
                if input_ids.shape != ids_buf.shape:
                    raise ValueError(f"input_ids must be {tuple(ids_buf.shape)} (one token per sequence), got "
                                     f"{tuple(input_ids.shape)}")
                before = [(layer._length, layer.group.length) for layer in layers]
                if logged:  # each token's position, before the step
                    table = logged[0].paged.table
                    rows = [table.get(s) for s in logged[0].seq_ids]
                    at = _LogStep(tuple(r.length for r in rows), (1,) * batch, (0,) * batch)
                    log_slots = [r.slot for r in rows]
                ids_buf.copy_(input_ids)
                out = graph()
                for layer in logged:  # phase 3: the step left each layer's input in a buffer; log it
                    layer.hidden_log.write(layer._static_hidden.view(batch, 1, -1), log_slots, at)
                for layer, (n, _) in zip(layers, before):  # Python ran for an eager step, not for a replay
                    layer._length = n + 1
                    layer._pending = 0
                for layer, (_, g) in zip(layers, before):
                    layer.group.length = g + 1
                return out

            run.graph = graph
            return run

        def evict(self) -> None:
            """Free now what the pattern no longer needs (each step's plan does it for the step before)."""
            done = set()
            for p in self.paged:
                if p is not None and id(p.table) not in done:
                    done.add(id(p.table))
                    p.evict()

        def debug_report(self, costs=None) -> str:
            """Where each layer's pages are (GPU pool, host tier) and ALISA's cost model
            (``s2dsl.runtime.tiering.plan``) for the current batch and length under this cache's
            budgets, with why. A cache that drops (``recompute``) states the drop point in force:
            with ``drop="cost"`` the decision the tiers apply (``tiering.DropPolicy``, the same
            object and numbers), with ``drop="budget"`` ``host_pages`` beside what the model would
            choose. ``costs``: ``MachineCosts`` to ask the model with instead (a what-if line
            when the tiers plan with their own)."""
            from ..runtime import tiering
            lines, seen = [], set()
            if self.split is not None:  # gpu_pages / host_pages="auto": the split chosen, its phase and why
                lines.append(f"split (auto): {self.split.report()}")
            for i, layer in enumerate(self.layers):
                p = layer.paged
                if p is None:
                    lines.append(f"layer {i}: not started")
                    continue
                if id(p.table) in seen:
                    continue
                seen.add(id(p.table))
                tier = p.table.tier
                log = (f"; hidden-state log {layer.hidden_log.nbytes / 2 ** 20:.1f} MiB"
                       if layer.hidden_log is not None else "")
                lines.append(f"layer {i} ({layer.pattern.name}, shared by {p.table.members}): GPU pool "
                             f"{p.pages_in_use}/{p.num_pages} pages" + (f"; {tier.report()}" if tier else "") + log)
            first = next((layer for layer in self.layers if layer.paged is not None), None)
            if first is None:
                return "\n".join(lines)
            p = first.paged
            tier = p.table.tier
            context = max(p.seq_len(s) for s in first.seq_ids)
            head = f"cost model (batch {len(first.seq_ids)}, {context} tokens, {len(self.layers)} layers): "
            if tier is not None and tier.drop:
                own = tier.policy or self.drop_policy
                d = own.decide(tier)
                limit = tier.drop_limit()  # what the tier applies at its next short step
                decision = d.plan.report() if d.plan is not None else d.reason
                if tier.drop_mode == "cost":
                    lines.append(head + decision)
                    lines.append(f"drop='cost' {d.report()}")
                else:
                    lines.append(head + decision)
                    lines.append(f"drop='budget' in force: drop past {limit} of {tier.host_pages} host pages per layer "
                                 f"(host_pages); the cost model would drop past {d.host_limit}")
                if costs is not None:
                    alt = tiering.DropPolicy(costs, hidden=self._hidden, fit=self._first_fit).decide(tier)
                    lines.append(f"with the given costs: {alt.report()}")
                return "\n".join(lines)
            costs = costs or self.costs or tiering.machine_costs(p.device)
            fit = self._fit_recompute(first)
            if fit is not None and not costs.recompute_measured:
                costs = tiering.with_recompute(costs, fit)
            n_layers = len(self.layers)
            hidden = self._hidden or 2 * p.kv_heads * p.head_dim
            w = tiering.workload_for(first.pattern, batch=len(first.seq_ids), context=context, head_dim=p.head_dim,
                                     hidden=hidden, layers=n_layers, kv_int8=p.quantized,
                                     kv_bytes=p.k_pages.element_size(), hidden_bytes=p.dtype.itemsize)
            host = (first.host_pages or 0) * w.page_bytes * n_layers
            try:
                decision = tiering.plan(w, p.num_pages * w.page_bytes * n_layers, host, costs, can_drop=False).report()
            except ValueError as exc:
                decision = f"no phase serves this: {exc}"
            lines.append(head + decision)
            return "\n".join(lines)

        def _fit_recompute(self, layer, pages: int = 8):
            """The recompute's cost fitted once on this machine through the first layer's own
            recompute path (its logged inputs, projections and rotary embedding) over up to
            ``pages`` blocks of its first sequence (``tiering.fit_recompute``); None without a
            recompute source or before a sequence holds two blocks."""
            fit = getattr(self, "_recompute_fit", None)
            if fit is not None:
                return fit
            p = layer.paged
            tier = p.table.tier
            fn = tier._recompute.get(id(p)) if tier is not None else None
            if fn is None or not layer.seq_ids:
                return None
            sid = layer.seq_ids[0]
            m = min(pages, p.seq_len(sid) // p.block)
            if m < 2:
                return None
            from ..runtime import tiering
            slot = torch.full((m,), p.slot(sid), dtype=torch.long)
            self._recompute_fit = tiering.fit_recompute(fn, slot, torch.zeros(m, dtype=torch.long),
                                                        torch.arange(m), p.device)
            return self._recompute_fit

        def dense_bytes(self) -> int:
            """What a dense cache of the same sequences would hold, all layers."""
            total = 0
            for p, layer in zip(self.paged, self.layers):
                if p is not None:
                    total += sum(p.seq_len(s) for s in layer.seq_ids) * p.kv_heads * p.head_dim * 2 \
                        * p.k_pages.element_size()
            return total

    _CLASSES.update(S2CacheLayer=S2CacheLayer, S2Cache=S2Cache, _Group=_Group)
    return _CLASSES


def __getattr__(name):  # S2Cache, S2CacheLayer: built when first asked for
    if name in ("S2Cache", "S2CacheLayer"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
