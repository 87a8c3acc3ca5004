"""ALISA's cost model: where a decode step's KV pages live, GPU, host or nowhere, and what it costs.

A decode step of one layer reads, per (sequence, kv head), the pages its pattern needs now:
the window, the static shards, the current top-k. Everything else a top-k head may select
later has to be kept somewhere. ALISA's three phases, chosen by what fits:

1. every page on the GPU: the step costs its kernel only;
2. the GPU holds what steps read (and as much else as fits), the host the rest: a page that the
   selection brings back from the host crosses the host link, on a side stream, overlapped with
   the previous layer's compute; only the part of the copy longer than that compute shows;
3. past the host budget too, the oldest pages are dropped, and when a dropped page is selected
   its K/V are recomputed on the GPU from the layer's input hidden states, which are kept (in host
   memory) instead: ``hidden`` numbers per token rather than ``2 · kv_heads · head_dim``. With
   multi-head attention that is half the bytes; under grouped-query attention it can be more
   than the K/V it stands for (Llama-3-8B: 4096 vs 2 · 8 · 128 = 2048) —
   ``Workload.recompute_saves_memory`` says which. Then phase 3 does not save memory; it only
   keeps host memory for K/V pages at the budget while the hidden states grow beside it.

``plan`` takes the workload, the budgets and the machine's measured costs (``MachineCosts``,
``measure_machine`` on the GPU) and returns a ``TierPlan``: the phase, the split, the predicted
time per step and its parts, and a sentence saying why — the debug report the cache exposes.
Churn (the share of a step's selected pages that the previous step did not select) is what
makes phases 2 and 3 cost anything; ALISA's accumulated scores keep it low; measure it with the
decode-side selection state and pass it in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
__all__ = ["MachineCosts", "Workload", "TierPlan", "plan", "measure_machine"]


@dataclass(frozen=True)
class MachineCosts:
    """What one machine does per second; ``measure_machine`` fits them on a GPU."""

    h2d_gbps: float = 20.0        # pinned host → device copies (ALISA's machines: ~20 GB/s)
    hbm_tbps: float = 3.0         # what the decode kernel reaches on the bytes it reads
    matmul_tflops: float = 300.0  # bf16 products of the recompute's shape (tokens x hidden x kv width)
    step_overhead_ms: float = 0.0  # fixed host/launch cost per layer step

    def __post_init__(self):
        for name in ("h2d_gbps", "hbm_tbps", "matmul_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Workload:
    """One decode step of one layer, over a batch; sizes in tokens and elements."""

    batch: int
    context: int              # tokens per sequence
    kv_heads: int
    head_dim: int
    block: int                # tokens per page
    hidden: int               # model width: what recompute keeps per token
    read_pages: int           # pages one (sequence, kv head) reads per step (window + static + top-k)
    topk_pages: int = 0       # of those, chosen dynamically (only these can miss)
    churn: float = 0.1        # share of the selected pages that are new each step
    kv_bytes: float = 2.0     # bytes per stored K/V element (2: bf16/fp16, 1: INT8 codes)
    hidden_bytes: float = 2.0
    layers: int = 1

    def __post_init__(self):
        if min(self.batch, self.context, self.kv_heads, self.head_dim, self.block, self.hidden, self.layers) < 1:
            raise ValueError("batch, context, kv_heads, head_dim, block, hidden and layers must be >= 1")
        if not 0 <= self.topk_pages <= self.read_pages:
            raise ValueError("topk_pages must lie in [0, read_pages]")
        if not 0.0 <= self.churn <= 1.0:
            raise ValueError(f"churn must lie in [0, 1], got {self.churn}")

    @property
    def pages_per_head(self) -> int:
        return math.ceil(self.context / self.block)

    @property
    def page_bytes(self) -> float:
        return 2 * self.block * self.head_dim * self.kv_bytes  # K and V

    @property
    def total_bytes(self) -> float:
        """Every page of every (layer, sequence, kv head): what a top-k pattern must keep somewhere."""
        return self.layers * self.batch * self.kv_heads * self.pages_per_head * self.page_bytes

    @property
    def read_bytes(self) -> float:
        return self.layers * self.batch * self.kv_heads * min(self.read_pages, self.pages_per_head) * self.page_bytes

    @property
    def recompute_saves_memory(self) -> bool:
        """Keeping hidden states instead of K/V saves memory only when hidden < 2 · kv_heads · head_dim."""
        return self.hidden * self.hidden_bytes < 2 * self.kv_heads * self.head_dim * self.kv_bytes


@dataclass(frozen=True)
class TierPlan:
    phase: int                 # 1, 2 or 3 (see the module docstring)
    gpu_bytes: float
    host_bytes: float
    dropped_tokens: int        # per sequence and layer (oldest first)
    kernel_ms: float
    transfer_ms: float         # host → GPU copies the step waits for (beyond the overlap)
    recompute_ms: float
    step_ms: float             # per layer
    reason: str

    def report(self) -> str:
        gib = 1 << 30
        return (f"phase {self.phase}: GPU {self.gpu_bytes / gib:.2f} GiB, host {self.host_bytes / gib:.2f} GiB, "
                f"{self.dropped_tokens} tokens dropped per sequence; step {self.step_ms:.3f} ms/layer "
                f"(kernel {self.kernel_ms:.3f}, transfer {self.transfer_ms:.3f}, recompute {self.recompute_ms:.3f}). "
                f"{self.reason}")


def plan(w: Workload, gpu_budget_bytes: float, host_budget_bytes: float, costs: MachineCosts = MachineCosts(),
         overlap_ms: float = 0.0) -> TierPlan:
    """Choose the phase and split for ``w`` under the budgets (bytes of KV, all layers).

    ``overlap_ms``: compute per layer that a side-stream copy can hide behind (the previous
    layer's attention and MLP)."""
    if gpu_budget_bytes < 0 or host_budget_bytes < 0:
        raise ValueError("budgets must be >= 0")
    per_layer = w.total_bytes / w.layers
    kernel_ms = w.read_bytes / w.layers / (costs.hbm_tbps * 1e12) * 1e3 + costs.step_overhead_ms
    if w.total_bytes <= gpu_budget_bytes:
        return TierPlan(1, w.total_bytes, 0.0, 0, kernel_ms, 0.0, 0.0, kernel_ms,
                        f"all {w.total_bytes / (1 << 30):.2f} GiB of KV fit the GPU budget: nothing moves")
    if w.read_bytes > gpu_budget_bytes:
        raise ValueError(f"the GPU budget ({gpu_budget_bytes / (1 << 30):.2f} GiB) is below what one step reads "
                         f"({w.read_bytes / (1 << 30):.2f} GiB): no split can serve this batch; lower the batch "
                         "or the pattern's budget")
    gpu = gpu_budget_bytes
    rest = w.total_bytes - gpu
    # a selected page is off the GPU with the probability that a non-read page is: the GPU
    # holds every read page plus an even share of the others
    others = w.total_bytes - w.read_bytes
    off_gpu = rest / others if others > 0 else 0.0
    new_pages = w.layers * w.batch * w.kv_heads * w.topk_pages * w.churn
    moved = new_pages * off_gpu / w.layers  # per layer step
    if rest <= host_budget_bytes:
        copy_ms = moved * w.page_bytes / (costs.h2d_gbps * 1e9) * 1e3
        transfer_ms = max(0.0, copy_ms - overlap_ms)
        return TierPlan(2, gpu, rest, 0, kernel_ms, transfer_ms, 0.0, kernel_ms + transfer_ms,
                        f"KV ({w.total_bytes / (1 << 30):.2f} GiB) exceeds the GPU budget by "
                        f"{rest / (1 << 30):.2f} GiB, which the host holds; {moved:.1f} pages per layer step come "
                        f"back over the host link ({copy_ms:.3f} ms, {min(copy_ms, overlap_ms):.3f} ms hidden)")
    # phase 3: drop the oldest tokens beyond both budgets; keep their hidden states (host memory)
    dropped_bytes = rest - host_budget_bytes
    per_token_kv = per_layer / (w.batch * w.context)
    per_token_hidden = w.hidden * w.hidden_bytes
    dropped_tokens = math.ceil(dropped_bytes / w.layers / w.batch / per_token_kv)
    if dropped_tokens >= w.context:
        raise ValueError("the budgets cannot hold even the recent pages: raise the GPU or host budget")
    hidden_bytes = w.layers * w.batch * dropped_tokens * per_token_hidden
    if hidden_bytes > dropped_bytes:
        reason_mem = (f"keeping hidden states costs {hidden_bytes / (1 << 30):.2f} GiB, more than the K/V they "
                      f"replace ({dropped_bytes / (1 << 30):.2f} GiB: hidden {w.hidden} > 2·kv_heads·head_dim = "
                      f"{2 * w.kv_heads * w.head_dim}); under this GQA shape dropping saves no memory, it only "
                      "holds the host's K/V pages at the budget")
    else:
        reason_mem = f"hidden states take {hidden_bytes / (1 << 30):.2f} GiB in place of {dropped_bytes / (1 << 30):.2f} GiB of K/V"
    # the selected pages off the GPU lie on the host or were dropped, in proportion to the bytes
    from_host = new_pages / w.layers * host_budget_bytes / others
    recompute_pages = new_pages / w.layers * dropped_bytes / others
    flops = recompute_pages * w.block * w.hidden * 2 * w.head_dim * 2  # one kv head's K and V projections
    recompute_ms = flops / (costs.matmul_tflops * 1e12) * 1e3
    copy_ms = from_host * w.page_bytes / (costs.h2d_gbps * 1e9) * 1e3
    transfer_ms = max(0.0, copy_ms - overlap_ms)
    return TierPlan(3, gpu, host_budget_bytes, dropped_tokens, kernel_ms, transfer_ms, recompute_ms,
                    kernel_ms + transfer_ms + recompute_ms,
                    f"KV exceeds GPU + host budgets by {dropped_bytes / (1 << 30):.2f} GiB: the oldest "
                    f"{dropped_tokens} tokens per sequence are dropped and recomputed when selected "
                    f"({recompute_pages:.1f} pages per layer step); {reason_mem}")


def measure_machine(device="cuda", nbytes: int = 256 << 20) -> MachineCosts:
    """Fit ``MachineCosts`` on ``device``: pinned host → device copies, a device copy (HBM), and
    a bf16 product of the recompute's shape, each timed with CUDA events (median of 5)."""
    import torch

    if torch.device(device).type != "cuda":
        raise ValueError("measure_machine times a CUDA device; on the CPU pass MachineCosts(...) yourself")

    def timed(fn, reps: int = 5) -> float:
        fn()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / (timed(lambda: dev.copy_(host, non_blocking=True)) * 1e-3) / 1e9
    other = torch.empty_like(dev)
    hbm = 2 * nbytes / (timed(lambda: other.copy_(dev)) * 1e-3) / 1e12  # read + write
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    b = torch.randn(4096, 1024, device=device, dtype=torch.bfloat16)
    tflops = 2 * 4096 * 4096 * 1024 / (timed(lambda: a @ b) * 1e-3) / 1e12
    return MachineCosts(h2d_gbps=h2d, hbm_tbps=hbm, matmul_tflops=tflops)


def with_int8(w: Workload) -> Workload:
    """The same workload with INT8 K/V codes (scale and bias per page channel: 2·4/block bytes more)."""
    return replace(w, kv_bytes=1.0 + 8.0 / w.block)


def workload_for(pattern, *, batch: int, context: int, head_dim: int, hidden: int, layers: int = 1,
                 kv_int8: bool = False, churn: float = 0.1) -> Workload:
    """The ``Workload`` of decoding ``batch`` sequences of ``context`` tokens under ``pattern``: the
    pages a step reads per kv head are the decode kernel's own count of its static blocks (largest
    over kv heads) plus the pattern's top-k."""
    import torch
    from ..codegen.lower import lower
    from .decode import kept_blocks_for_query
    from .host_tier import StepReads
    top = lower(pattern).max_topk if lower(pattern).has_topk else 0
    last = max(context - 1, 0)
    static = max(kept_blocks_for_query(pattern, g, last, last) for g in range(pattern.kv_heads))
    pages = math.ceil(max(context, 1) / pattern.block)
    # the tier's own count (a relative stride's residue beyond the window included)
    tier_reads = StepReads(pattern).needed(torch.full((1, 1, 1), last // pattern.block),
                                           torch.arange(pages).view(1, 1, -1))
    static = max(static, int(tier_reads.sum(-1).max()))
    read = min(static + top, pages)
    w = Workload(batch=batch, context=max(context, 1), kv_heads=pattern.kv_heads, head_dim=head_dim,
                 block=pattern.block, hidden=hidden, read_pages=read, topk_pages=min(top, read), churn=churn,
                 layers=layers)
    return with_int8(w) if kv_int8 else w
