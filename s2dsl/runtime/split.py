"""ALISA's split of a KV cache between the GPU and the host, chosen from the machine's memory
(``S2Cache(gpu_pages="auto")``; the drop point within the split stays ``tiering.DropPolicy``'s).

Budgets, in KV bytes over all layers:

- GPU: ``free - headroom``. ``free`` is what the device can still give (``device_free_bytes``:
  the driver's free memory plus what PyTorch's caching allocator holds reserved but unused);
  ``headroom`` is what the model's forwards need beside the cache (``activation_headroom``).
- host: what the host tier may pin (default ``HOST_FRACTION`` of the host's available memory,
  ``host_available_bytes``), less the hidden-state log a dropping cache keeps there.

Per layer ``l`` the caller gives ``need`` (the pages the all-resident cache allocates: every block
a top-k head may select again), ``step`` (what one decode step cannot do without:
``tiering.step_pages``) and the bytes of one page. ``choose_split``:

1. phase 1 when every layer's ``need`` fits the GPU budget: the pools are ``need``, no host tier,
   nothing moves;
2. else each layer keeps ``step`` on the GPU and the budget left is shared in proportion to what
   each layer would otherwise spill: ``gpu = step + floor(f * (need - step))`` with ``f`` the share
   of ``sum((need - step) * page)`` the budget left covers (a layer that reads everything it
   holds, ``need == step``, keeps it all). The rest, ``need - gpu``, goes to the host when the
   host budget holds it (phase 2);
3. else (only with a recompute source) each layer's host pages are its rest scaled to the host
   budget, and the tier drops past them (phase 3).

Why the GPU gets all it can: the cost model never predicts a faster step with less GPU
(``tiering.plan``; ``tests/test_tiering.py::test_less_gpu_never_predicts_faster``), so the split
is decided by what fits, and the choice left — keep the rest on the host or drop it — is
``DropPolicy``'s, per batch and length bucket, within the host pages chosen here.

Refused, with what is needed and what to pass: a GPU budget below ``sum(step * page)``, and a
rest beyond the host budget with nothing to recompute from.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

__all__ = ["TierSplit", "choose_split", "device_free_bytes", "host_available_bytes", "activation_headroom",
           "kv_page_bytes", "format_bytes", "HOST_FRACTION", "HEADROOM_SLACK", "HEADROOM_FIXED"]

#: share of the host's available memory the host tier may pin by default: pinned pages cannot be
#: swapped, and the rest of the process (the model's host copy while loading, the tokenizer, the
#: hidden-state log's staging) and other processes live there too
HOST_FRACTION = 0.5
#: the caching allocator rounds blocks up and splits segments, so a forward's live tensors take
#: more device memory than their bytes; 1.25 covers its rounding at these sizes
HEADROOM_SLACK = 1.25
#: cuBLAS / cuBLASLt workspaces, Triton's and the decode kernel's split-K scratch, a CUDA graph's
#: private pool: present whatever the shapes
HEADROOM_FIXED = 256 << 20

GIB = 1 << 30


def device_free_bytes(device) -> int:
    """Bytes the device can still give: ``torch.cuda.mem_get_info``'s free memory after PyTorch's
    caching allocator has returned its unused blocks (``empty_cache``: counted as free while
    cached, fragments of them could not hold a pool of gigabytes). Only CUDA devices can be read;
    elsewhere a ValueError says what to pass."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"the free memory of device {device} cannot be read (only CUDA devices report it): pass "
                         "free_memory=BYTES (or a callable of the device) for gpu_pages='auto', or gpu_pages=N")
    torch.cuda.empty_cache()
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def host_available_bytes() -> int:
    """Host memory available to new allocations: /proc/meminfo's MemAvailable (what Linux can give
    without swapping, page cache it may reclaim included), else ``os.sysconf``'s available physical
    pages (free pages only). A ValueError when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        raise ValueError("the host's available memory cannot be read here: pass host_memory=BYTES or "
                         "host_pages=N") from None


def activation_headroom(*, batch: int, tokens: int, hidden: int, intermediate: int, heads: int, kv_heads: int,
                        head_dim: int, vocab: int, dtype_bytes: int) -> int:
    """Device bytes a decoder forward of ``batch`` x ``tokens`` needs beside its KV cache and weights:

        HEADROOM_SLACK * (batch * tokens * dtype_bytes * (4 * hidden + 2 * (heads + 2 * kv_heads) * head_dim
                                                         + 3 * intermediate)
                          + batch * vocab * (dtype_bytes + 4))
        + HEADROOM_FIXED

    Per token of the layer being run: the embeddings (the model's layer loop keeps them), the
    layer's input (its residual), its normed copy and the sum being formed (4 hidden), q, k, v
    and their rotary-embedded copies (2 (heads + 2 kv_heads) head_dim), and the MLP's gate, up and
    their product alive together (3 intermediate); layers run one after another, so one layer's
    worth. Logits of the last position per sequence (what ``generate`` keeps), and its float32
    copy. ``tokens``: the longest forward (a prefill chunk, else the whole prompt). A forward that
    returns every position's logits needs ``batch * tokens * vocab`` more: pass ``headroom=``."""
    for name, v in (("batch", batch), ("tokens", tokens), ("hidden", hidden), ("intermediate", intermediate),
                    ("heads", heads), ("kv_heads", kv_heads), ("head_dim", head_dim), ("vocab", vocab),
                    ("dtype_bytes", dtype_bytes)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    per_token = dtype_bytes * (4 * hidden + 2 * (heads + 2 * kv_heads) * head_dim + 3 * intermediate)
    live = batch * tokens * per_token + batch * vocab * (dtype_bytes + 4)
    return int(HEADROOM_SLACK * live) + HEADROOM_FIXED


def kv_page_bytes(block: int, head_dim: int, elem_bytes: int, quantized: bool) -> int:
    """One page of K plus its page of V (INT8: with a float32 scale and bias per channel each),
    as ``PagedKVCache.page_bytes`` counts it."""
    return 2 * block * head_dim * elem_bytes + (2 * 2 * head_dim * 4 if quantized else 0)


def format_bytes(n: float) -> str:
    """Bytes in the largest unit that leaves at least 1 of it (GiB, MiB, KiB), else in bytes."""
    for unit, scale in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _per_layer(values: Sequence[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


@dataclass(frozen=True)
class TierSplit:
    """The split ``choose_split`` chose: per layer GPU pages and host pages (None: no host tier),
    the phase at the length the cache was sized for, and where the budgets came from."""

    phase: int
    gpu_pages: Tuple[int, ...]
    host_pages: Optional[Tuple[int, ...]]
    need_pages: Tuple[int, ...]
    step_pages: Tuple[int, ...]
    page_bytes: Tuple[int, ...]
    gpu_budget: Optional[int]       # KV bytes, all layers (None: the GPU pools were given)
    host_budget: Optional[int]      # bytes the host pages may take (None: given, or no host asked)
    gpu_source: str                 # e.g. "free 61.20 GiB - headroom 6.00 GiB"
    host_source: str
    reason: str
    prefill_tokens: Optional[int] = None  # the longest first prefill the GPU pools hold (tiered splits)

    def report(self) -> str:
        gpu = f"GPU {_per_layer(self.gpu_pages)}"
        if self.gpu_budget is not None:
            gpu += f" (budget {format_bytes(self.gpu_budget)} = {self.gpu_source})"
        else:
            gpu += " (given)"
        host = "no host tier"
        if self.host_pages is not None:
            host = f"host {_per_layer(self.host_pages)}"
            if self.host_budget is not None:
                host += f" (budget {format_bytes(self.host_budget)}: {self.host_source})"
            else:
                host += " (given)"
        prefill = ""
        if self.prefill_tokens is not None:
            prefill = (f" A first prefill of up to {self.prefill_tokens:,} tokens per sequence fits the GPU pools "
                       "(the tier does not spill during one).")
        return (f"phase {self.phase}: need {_per_layer(self.need_pages)} pages/layer, {gpu}, {host}"
                f"{' pages/layer' if self.host_pages is not None else ''}. {self.reason}{prefill}")


def choose_split(need: Sequence[int], step: Sequence[int], page_bytes: Sequence[int], *,
                 gpu_budget: Optional[int] = None, gpu_pages: Optional[Sequence[int]] = None,
                 host_budget: Optional[int] = None, host_pages: Optional[Sequence[int]] = None,
                 can_drop: bool = False, gpu_source: str = "", host_source: str = "") -> TierSplit:
    """The split for layers of ``need`` / ``step`` pages of ``page_bytes`` each (see the module
    docstring). Either ``gpu_budget`` (bytes, all layers) or ``gpu_pages`` (per layer, given);
    either ``host_budget`` (bytes) or ``host_pages`` (per layer, given). ``can_drop``: a recompute
    source exists (phase 3 allowed)."""
    n = len(need)
    if not n or len(step) != n or len(page_bytes) != n:
        raise ValueError("need, step and page_bytes must give one value per layer")
    if (gpu_budget is None) == (gpu_pages is None):
        raise ValueError("give gpu_budget (bytes) or gpu_pages (per layer), one of them")
    if host_budget is None and host_pages is None:
        raise ValueError("give host_budget (bytes) or host_pages (per layer)")
    step = [min(s, d) for s, d in zip(step, need)]
    total = sum(d * b for d, b in zip(need, page_bytes))
    if gpu_pages is None:
        if gpu_budget < 0:
            raise ValueError(f"the GPU budget is negative ({gpu_source}): nothing is left for the KV cache; pass a "
                             "smaller headroom=, free device memory, or give gpu_pages=N")
        if total <= gpu_budget:
            return TierSplit(1, tuple(need), None, tuple(need), tuple(step), tuple(page_bytes), gpu_budget, None,
                             gpu_source, host_source,
                             f"All {format_bytes(total)} of KV fit the GPU budget: no host tier, nothing moves.")
        least = sum(s * b for s, b in zip(step, page_bytes))
        if least > gpu_budget:
            worst = max(range(n), key=lambda i: step[i])
            raise ValueError(
                f"gpu_pages='auto': the GPU budget {format_bytes(gpu_budget)} ({gpu_source}) is below what one "
                f"decode step needs on the GPU: {format_bytes(least)} ({_per_layer(step)} pages/layer, e.g. layer "
                f"{worst}: {step[worst]:,} pages of {page_bytes[worst]:,} B). Free device memory, pass a smaller "
                f"headroom= or free_memory=, "
                f"lower batch_size or max_length, or pass gpu_pages={max(step)} (per layer) with host_pages")
        spare = sum((d - s) * b for d, s, b in zip(need, step, page_bytes))
        f = (gpu_budget - least) / spare  # < 1: the total did not fit
        gpu = [s + int(f * (d - s)) for d, s in zip(need, step)]
    else:
        gpu = list(gpu_pages)
        if len(gpu) != n:
            raise ValueError(f"{len(gpu)} GPU pool sizes for {n} layers")
    rest = [max(d - g, 0) for d, g in zip(need, gpu)]
    rest_bytes = sum(r * b for r, b in zip(rest, page_bytes))
    if rest_bytes == 0:  # given GPU pools that hold the need
        return TierSplit(1, tuple(gpu), None, tuple(need), tuple(step), tuple(page_bytes), gpu_budget, None,
                         gpu_source, host_source, "The GPU pools hold every page the cache needs: no host tier.")
    off = f"{format_bytes(rest_bytes)} of KV ({_per_layer(rest)} pages/layer) do not fit the GPU"
    if host_pages is not None:
        host = list(host_pages)
        if len(host) != n:
            raise ValueError(f"{len(host)} host pool sizes for {n} layers")
        if all(h >= r for h, r in zip(host, rest)):
            return TierSplit(2, tuple(gpu), tuple(host), tuple(need), tuple(step), tuple(page_bytes), gpu_budget,
                             None, gpu_source, host_source, f"{off}; the given host pages hold them.")
        if not can_drop:
            raise ValueError(f"{off} and host_pages ({_per_layer(host)}) hold fewer; nothing can be dropped without "
                             "recompute='hidden': raise host_pages (or host_pages='auto'), or recompute dropped pages")
        return TierSplit(3, tuple(gpu), tuple(host), tuple(need), tuple(step), tuple(page_bytes), gpu_budget, None,
                         gpu_source, host_source, f"{off}; the given host pages hold fewer: the oldest are dropped and "
                         "recomputed when read (the cost model may drop earlier).")
    if host_budget < 0:
        raise ValueError(f"no host memory is left for the host tier ({host_source}): pass host_memory=BYTES (more "
                         "than the hidden-state log recompute='hidden' keeps, if any) or host_pages=N")
    if rest_bytes <= host_budget:
        return TierSplit(2, tuple(gpu), tuple(rest), tuple(need), tuple(step), tuple(page_bytes), gpu_budget,
                         host_budget, gpu_source, host_source,
                         f"{off}; the host holds them" + ("; the cost model decides whether to drop before the host "
                                                          "is full." if can_drop else "."))
    if not can_drop:
        raise ValueError(f"{off} and the host budget ({format_bytes(host_budget)}: {host_source}) holds "
                         f"{format_bytes(rest_bytes - host_budget)} less: pass recompute='hidden' (drop the oldest "
                         "pages and recompute them, phase 3), raise host_memory=, or lower batch_size or max_length")
    host = [int(r * host_budget / rest_bytes) for r in rest]
    return TierSplit(3, tuple(gpu), tuple(host), tuple(need), tuple(step), tuple(page_bytes), gpu_budget,
                     host_budget, gpu_source, host_source,
                     f"{off} and the host budget holds {format_bytes(host_budget)} of them: past it the oldest pages "
                     "are dropped and recomputed when read (the cost model may drop earlier).")
