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

Limits: no padding inside a batch (sequences of a batch have equal lengths; use the
``PagedKVCache`` directly for continuous batching), no beam search (``reorder_cache``),
no cropping (assisted decoding), no dropout. transformers is imported only by the
functions here, never by ``import s2dsl``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Union

import torch

from ..pattern import Pattern
from ..runtime.kv_cache import PagedKVCache, dense_pattern

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
    (which both refuse: a batch must not be padded).
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
    raise NotImplementedError("s2dsl attention does not take padded batches (an attention mask with zeros); "
                              "give sequences of equal length, or use s2dsl.runtime.kv_cache.PagedKVCache "
                              "directly for batches of different lengths")


# ------------------------------------------------------------------------------ attention functions
def s2dsl_attention_forward(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: Optional[torch.Tensor], scaling: Optional[float] = None,
                            dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature: q (b, h, n, d), k/v (b, kv_heads, m, d) -> (b, n, h, d), None."""
    from ..runtime.api import attention
    if dropout:
        raise NotImplementedError("s2dsl attention has no dropout; evaluate the model (model.eval())")
    pattern = _pattern_of(module)
    _refuse_padding(attention_mask)
    layer = getattr(key, "_s2dsl_layer", None)
    if layer is not None:  # S2Cache: key/value are this step's new tokens only
        out = layer.attend(query, key, value, scaling)
    else:
        out = attention(query, key, value, pattern, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


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
def pages_needed(pattern: Pattern, max_length: int, batch_size: int) -> int:
    """Pool size for ``batch_size`` sequences of up to ``max_length`` tokens under ``pattern``:
    per (sequence, kv head) the blocks the pattern keeps at that length, plus one."""
    from ..runtime.kv_cache import _group_rules, _kv_efficient_heads
    rules = _group_rules(pattern, _kv_efficient_heads(pattern))
    n_blocks = -(-max_length // pattern.block)
    i = max(n_blocks - 1, 0)
    per_seq = sum(sum(1 for j in range(n_blocks) if r.needed(i, j)) + 1 for r in rules)
    return batch_size * per_seq


_CLASSES = {}


def _classes():
    """Build the transformers subclasses on first use (transformers is imported only then)."""
    if _CLASSES:
        return _CLASSES
    from transformers.cache_utils import Cache, CacheLayerMixin

    class S2CacheLayer(CacheLayerMixin):
        """One layer of ``S2Cache``: a ``PagedKVCache`` with one sequence per batch row."""

        is_compileable = False
        is_sliding = False
        is_croppable = False

        def __init__(self, pattern: Pattern, num_pages: int):
            super().__init__()
            self.pattern, self.num_pages = pattern, num_pages
            self.paged: Optional[PagedKVCache] = None
            self.seq_ids: tuple = ()
            self._pending = 0

        def lazy_initialization(self, key_states, value_states):
            b, _, _, d = key_states.shape
            self.dtype, self.device = key_states.dtype, key_states.device
            self.paged = PagedKVCache(self.pattern, num_pages=self.num_pages, head_dim=d, dtype=key_states.dtype,
                                      device=key_states.device, max_seqs=b)
            self.seq_ids = tuple(self.paged.add_sequence() for _ in range(b))
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
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

        def attend(self, query, key, value, scale):
            self._pending = 0
            return self.paged.attend(self.seq_ids, query, key, value, scale=scale)

        def get_seq_length(self) -> int:
            if self.paged is None:
                return 0
            return self.paged.seq_len(self.seq_ids[0]) + self._pending

        def get_mask_sizes(self, query_length: int):
            return self.get_seq_length() + query_length, 0

        def get_max_length(self) -> int:
            return -1

        def reset(self) -> None:
            if self.paged is not None:
                for s in self.seq_ids:
                    self.paged.remove_sequence(s)
                self.seq_ids = tuple(self.paged.add_sequence() for _ in self.seq_ids)
            self._pending = 0

        def reorder_cache(self, beam_idx) -> None:
            if torch.equal(beam_idx.cpu(), torch.arange(len(self.seq_ids))):
                return
            raise NotImplementedError("S2Cache does not reorder sequences (beam search)")

        def crop(self, tokens_to_remove: int) -> None:
            raise NotImplementedError("S2Cache cannot crop: pages the pattern no longer needed are already freed")

        def batch_repeat_interleave(self, repeats: int) -> None:
            raise NotImplementedError("S2Cache does not repeat sequences")

        def batch_select_indices(self, indices) -> None:
            raise NotImplementedError("S2Cache does not select sequences")

    class S2Cache(Cache):
        """transformers ``Cache`` over s2dsl's paged KV caches, one per layer (see the module docstring).

        ``model`` must have been through ``apply`` (its patterns per layer), or pass
        ``patterns`` (one Pattern per layer). Pool size per layer: ``num_pages`` (an int or
        one per layer), else enough for ``batch_size`` sequences of ``max_length`` tokens
        under the layer's pattern (``pages_needed``).
        """

        def __init__(self, model=None, *, max_length: Optional[int] = None, batch_size: int = 1,
                     num_pages: Union[int, Sequence[int], None] = None, patterns: Optional[Sequence[Pattern]] = None):
            if patterns is None:
                patterns = getattr(model, "s2dsl_patterns", None)
                if patterns is None:
                    raise ValueError("S2Cache needs a model prepared by s2dsl.integrations.hf.apply, or patterns=...")
            patterns = list(patterns)
            if num_pages is None:
                if max_length is None:
                    raise ValueError("give max_length (tokens per sequence) or num_pages to size the page pools")
                num_pages = [pages_needed(p, max_length, batch_size) for p in patterns]
            elif isinstance(num_pages, int):
                num_pages = [num_pages] * len(patterns)
            super().__init__(layers=[S2CacheLayer(p, n) for p, n in zip(patterns, num_pages)])

        @property
        def paged(self) -> List[Optional[PagedKVCache]]:
            """The per-layer ``PagedKVCache`` (None before the first forward)."""
            return [layer.paged for layer in self.layers]

        def memory_bytes(self) -> int:
            """K/V bytes of the pages in use, all layers."""
            return sum(p.memory_bytes() for p in self.paged if p is not None)

        def dense_bytes(self) -> int:
            """What a dense cache of the same sequences would hold, all layers."""
            total = 0
            for p, layer in zip(self.paged, self.layers):
                if p is not None:
                    total += sum(p.seq_len(s) for s in layer.seq_ids) * p.kv_heads * p.head_dim * 2 \
                        * p.k_pages.element_size()
            return total

    _CLASSES.update(S2CacheLayer=S2CacheLayer, S2Cache=S2Cache)
    return _CLASSES


def __getattr__(name):  # S2Cache, S2CacheLayer: built when first asked for
    if name in ("S2Cache", "S2CacheLayer"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
