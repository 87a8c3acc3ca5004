"""ALISA's cost model: where a decode step's KV pages live, GPU, host or nowhere, and what it costs.

A decode step of one layer reads, per (sequence, kv head), the pages its pattern needs now:
the window, the static shards, the current top-k. Everything else a top-k head may select
later has to be kept somewhere. ALISA's three phases, chosen by what fits and by what costs
less:

1. every page on the GPU: the step costs its kernel only;
2. the GPU holds what steps read (and as much else as fits), the host the rest: a page that the
   selection brings back from the host crosses the host link, on a side stream, overlapped with
   the previous layer's compute; only the part of the copy longer than that compute shows;
3. past the host budget too — or before it, when recomputing a page costs less than fetching
   it (a slow link, a fast recompute) — the oldest pages are dropped, and when a dropped page is selected
   its K/V are recomputed on the GPU from the layer's input hidden states, which are kept (in host
   memory) instead: ``hidden`` numbers per token rather than ``2 · kv_heads · head_dim``. With
   multi-head attention that is half the bytes; under grouped-query attention it can be more
   than the K/V it stands for (Llama-3-8B: 4096 vs 2 · 8 · 128 = 2048) —
   ``Workload.recompute_saves_memory`` says which. Then phase 3 does not save memory; it only
   keeps host memory for K/V pages at the budget while the hidden states grow beside it.

``plan`` takes the workload, the budgets and the machine's measured costs (``MachineCosts``:
``measure_machine`` on the GPU for the link, HBM and matmul rates; ``fit_recompute`` for the
recompute, timed through the recompute path itself) and returns a ``TierPlan``: the phase, the split, the predicted
time per step and its parts, and a sentence saying why — the debug report the cache exposes.
Churn (the share of a step's selected pages that the previous step did not select) is what
makes phases 2 and 3 cost anything; ALISA's accumulated scores keep it low; measure it with the
decode-side selection state and pass it in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from .timing import event_ms, wall_ms

__all__ = ["MachineCosts", "Workload", "TierPlan", "plan", "measure_machine", "fit_recompute", "with_recompute",
           "DropPolicy", "DropDecision", "DROP_MODES", "machine_costs", "step_pages", "drop_mode"]


@dataclass(frozen=True)
class MachineCosts:
    """What one machine does per second; ``measure_machine`` fits them on a GPU.

    ``recompute_page_ms`` / ``recompute_fixed_ms``: the time of recomputing dropped pages on this
    machine, fitted on the recompute path itself (``fit_recompute``: per page, and per layer step
    that recomputes anything). Left ``None``, a page's recompute is modelled from the link and
    the matmul rate (``recompute_ms_per_page``)."""

    h2d_gbps: float = 20.0        # pinned host → device copies (ALISA's machines: ~20 GB/s)
    hbm_tbps: float = 3.0         # what the decode kernel reaches on the bytes it reads
    matmul_tflops: float = 300.0  # bf16 products of the recompute's shape (tokens x hidden x kv width)
    step_overhead_ms: float = 0.0  # fixed host/launch cost per layer step
    recompute_page_ms: Optional[float] = None  # measured per page (fit_recompute), else modelled
    recompute_fixed_ms: float = 0.0            # measured per layer step that recomputes

    def __post_init__(self):
        for name in ("h2d_gbps", "hbm_tbps", "matmul_tflops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.recompute_page_ms is not None and not self.recompute_page_ms > 0:
            raise ValueError(f"recompute_page_ms must be positive, got {self.recompute_page_ms}")
        if not self.recompute_fixed_ms >= 0:
            raise ValueError(f"recompute_fixed_ms must be >= 0, got {self.recompute_fixed_ms}")

    @property
    def recompute_measured(self) -> bool:
        return self.recompute_page_ms is not None

    def fetch_ms_per_page(self, w: "Workload") -> float:
        """One page (K and V of one kv head's block) up the host link."""
        return w.page_bytes / (self.h2d_gbps * 1e9) * 1e3

    def recompute_ms_per_page(self, w: "Workload") -> float:
        """One dropped page made again: the measured figure, else the model of what the recompute
        does — its block's logged hidden states up the link and the K and V projections of every
        kv head over them (the callback projects whole tokens; pages of one block read by several
        kv heads share the product, which this bound does not count)."""
        if self.recompute_page_ms is not None:
            return self.recompute_page_ms
        link = w.block * w.hidden * w.hidden_bytes / (self.h2d_gbps * 1e9) * 1e3
        flops = 2 * w.block * w.hidden * 2 * w.kv_heads * w.head_dim
        return link + flops / (self.matmul_tflops * 1e12) * 1e3


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
    pages_up: float = 0.0          # per layer step, expected
    pages_recomputed: float = 0.0  # per layer step, expected
    fetch_page_ms: float = 0.0     # the costs the choice compared, per page
    recompute_page_ms: float = 0.0
    recompute_measured: bool = False
    h2d_gbps: float = 0.0

    def report(self) -> str:
        costs = ""
        if self.phase > 1:
            costs = (f" Costs: host link {self.h2d_gbps:.1f} GB/s, fetch {self.fetch_page_ms * 1e3:.2f} us/page, "
                     f"recompute {self.recompute_page_ms * 1e3:.2f} us/page "
                     f"({'measured on this machine' if self.recompute_measured else 'modelled, not measured'}); "
                     f"expected per layer step: {self.pages_up:.2f} pages up, {self.pages_recomputed:.2f} recomputed.")
        return (f"phase {self.phase}: GPU {_size(self.gpu_bytes)}, host {_size(self.host_bytes)}, "
                f"{self.dropped_tokens} tokens dropped per sequence; step {self.step_ms:.3f} ms/layer "
                f"(kernel {self.kernel_ms:.3f}, transfer {self.transfer_ms:.3f}, recompute {self.recompute_ms:.3f}). "
                f"{self.reason}{costs}")


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def plan(w: Workload, gpu_budget_bytes: float, host_budget_bytes: float, costs: MachineCosts = MachineCosts(),
         overlap_ms: float = 0.0, can_drop: bool = True) -> TierPlan:
    """Choose the phase and split for ``w`` under the budgets (bytes of KV, all layers).

    Past the GPU budget the bytes that do not fit are either kept on the host (a selected page
    comes back over the link) or dropped (it is recomputed): ALISA's choice between phases 2 and
    3. Dropping is forced past the host budget, and chosen before it when the costs say so: the
    predicted step is compared at the least drop the budgets allow, at dropping everything off
    the GPU, and at the drop where the copies just fit behind ``overlap_ms`` (the step's time is
    convex in the dropped bytes, so one of these is its minimum); ties keep the smaller drop.
    ``can_drop=False`` (no recompute source): past the host budget nothing serves.

    ``overlap_ms``: compute per layer that a side-stream copy can hide behind (the previous
    layer's attention and MLP); a recompute runs on the compute stream and hides behind nothing."""
    if gpu_budget_bytes < 0 or host_budget_bytes < 0:
        raise ValueError("budgets must be >= 0")
    per_layer = w.total_bytes / w.layers
    kernel_ms = w.read_bytes / w.layers / (costs.hbm_tbps * 1e12) * 1e3 + costs.step_overhead_ms
    if w.total_bytes <= gpu_budget_bytes:
        return TierPlan(1, w.total_bytes, 0.0, 0, kernel_ms, 0.0, 0.0, kernel_ms,
                        f"all {_size(w.total_bytes)} of KV fit the GPU budget: nothing moves",
                        h2d_gbps=costs.h2d_gbps)
    if w.read_bytes > gpu_budget_bytes:
        raise ValueError(f"the GPU budget ({gpu_budget_bytes / (1 << 30):.2f} GiB) is below what one step reads "
                         f"({w.read_bytes / (1 << 30):.2f} GiB): no split can serve this batch; lower the batch "
                         "or the pattern's budget")
    gpu = gpu_budget_bytes
    rest = w.total_bytes - gpu
    least_drop = max(0.0, rest - host_budget_bytes)
    if least_drop > 0 and not can_drop:
        raise ValueError(f"KV exceeds the GPU and host budgets by {least_drop / (1 << 30):.2f} GiB and nothing "
                         "can be dropped (no recompute source): raise host_pages or recompute dropped pages")
    # a selected page is off the GPU with the probability that a non-read page is: the GPU holds
    # every read page plus an even share of the others; off the GPU it lies on the host or was
    # dropped, in proportion to the bytes
    others = w.total_bytes - w.read_bytes
    new_pages = w.batch * w.kv_heads * w.topk_pages * w.churn  # per layer step
    fetch_page = costs.fetch_ms_per_page(w)
    rec_page = costs.recompute_ms_per_page(w)

    def step(drop: float):
        up = new_pages * (rest - drop) / others if others > 0 else 0.0
        rec = new_pages * drop / others if others > 0 else 0.0
        copy_ms = up * fetch_page
        recompute_ms = rec * rec_page + (costs.recompute_fixed_ms if rec > 0 else 0.0)
        return max(0.0, copy_ms - overlap_ms) + recompute_ms, up, rec, copy_ms, recompute_ms

    choices = [least_drop]
    if can_drop:
        choices.append(rest)
        if new_pages > 0 and fetch_page > 0 and others > 0:  # the copies just fit behind the overlap
            hidden_up = overlap_ms / fetch_page
            choices.append(min(rest, max(least_drop, rest - hidden_up * others / new_pages)))
    choices.sort()
    drop = min(choices, key=lambda d: step(d)[0])  # min keeps the first (smallest drop) of equals
    extra, up, rec, copy_ms, recompute_ms = step(drop)
    transfer_ms = max(0.0, copy_ms - overlap_ms)
    common = dict(pages_up=up, pages_recomputed=rec, fetch_page_ms=fetch_page, recompute_page_ms=rec_page,
                  recompute_measured=costs.recompute_measured, h2d_gbps=costs.h2d_gbps)
    if drop == 0:
        why = ""
        if can_drop and new_pages > 0:
            why = (f"; fetching a page ({fetch_page * 1e3:.2f} us) beats recomputing it ({rec_page * 1e3:.2f} us), "
                   "so nothing is dropped while the host has room")
        return TierPlan(2, gpu, rest, 0, kernel_ms, transfer_ms, 0.0, kernel_ms + transfer_ms,
                        f"KV ({_size(w.total_bytes)}) exceeds the GPU budget by "
                        f"{_size(rest)}, which the host holds; {up:.1f} pages per layer step come "
                        f"back over the host link ({copy_ms:.3f} ms, {min(copy_ms, overlap_ms):.3f} ms hidden)" + why,
                        **common)
    # phase 3: drop the oldest tokens; keep their hidden states (host memory)
    per_token_kv = per_layer / (w.batch * w.context)
    per_token_hidden = w.hidden * w.hidden_bytes
    dropped_tokens = math.ceil(drop / w.layers / w.batch / per_token_kv)
    if dropped_tokens >= w.context:
        raise ValueError("the budgets cannot hold even the recent pages: raise the GPU or host budget")
    hidden_bytes = w.layers * w.batch * dropped_tokens * per_token_hidden
    if hidden_bytes > drop:
        reason_mem = (f"keeping hidden states costs {_size(hidden_bytes)}, more than the K/V they "
                      f"replace ({_size(drop)}: hidden {w.hidden} > 2·kv_heads·head_dim = "
                      f"{2 * w.kv_heads * w.head_dim}); under this GQA shape dropping saves no memory, it only "
                      "holds the host's K/V pages at the budget")
    else:
        reason_mem = f"hidden states take {_size(hidden_bytes)} in place of {_size(drop)} of K/V"
    if drop > least_drop:
        why = (f"recomputing a page ({rec_page * 1e3:.2f} us) is cheaper than fetching what the overlap does not hide "
               f"({fetch_page * 1e3:.2f} us a page): {_size(drop)} are dropped although the host "
               f"budget needs only {_size(least_drop)} dropped")
    else:
        why = f"KV exceeds GPU + host budgets by {_size(drop)}"
    host_used = rest - drop
    return TierPlan(3, gpu, host_used, dropped_tokens, kernel_ms, transfer_ms, recompute_ms,
                    kernel_ms + transfer_ms + recompute_ms,
                    f"{why}: the oldest {dropped_tokens} tokens per sequence are dropped and recomputed when selected "
                    f"({rec:.1f} pages per layer step); {reason_mem}", **common)


def fit_recompute(recompute, slots, kv_heads, blocks, device="cpu", reps: int = 5) -> MachineCosts:
    """Fit the recompute's cost on this machine by running the recompute path itself:
    ``recompute(slots, kv_heads, blocks)`` (a ``host_tier.Recompute``: int64 CPU tensors of m
    pages, each of a different block so that no product is shared) on the first page and on all
    m; the line through the two medians gives the time per page and per call. Host work, the
    log's copy up the link and the products are all in it (wall time, synchronised on CUDA).
    Returns a ``MachineCosts`` whose recompute fields hold the fit (the others are defaults):
    ``with_recompute(costs, fit)`` puts them into measured costs."""
    m = int(slots.numel())
    if m < 2 or kv_heads.numel() != m or blocks.numel() != m:
        raise ValueError("fit_recompute needs m >= 2 pages (slots, kv_heads, blocks of m entries each)")
    one = wall_ms(lambda: recompute(slots[:1], kv_heads[:1], blocks[:1]), device, reps)
    many = wall_ms(lambda: recompute(slots, kv_heads, blocks), device, reps)
    per_page = max((many - one) / (m - 1), 1e-6)  # a flat line (noise) still counts a page as something
    return MachineCosts(recompute_page_ms=per_page, recompute_fixed_ms=max(one - per_page, 0.0))


def with_recompute(costs: MachineCosts, fit: MachineCosts) -> MachineCosts:
    """``costs`` with the recompute figures of ``fit`` (``fit_recompute``)."""
    return replace(costs, recompute_page_ms=fit.recompute_page_ms, recompute_fixed_ms=fit.recompute_fixed_ms)


def measure_machine(device="cuda", nbytes: int = 256 << 20) -> MachineCosts:
    """Fit ``MachineCosts`` on ``device``: pinned host → device copies, a device copy (HBM), and
    a bf16 product of the recompute's shape, each timed with CUDA events (median of 5)."""
    import torch

    if torch.device(device).type != "cuda":
        raise ValueError("measure_machine times a CUDA device; on the CPU pass MachineCosts(...) yourself")

    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / (event_ms(lambda: dev.copy_(host, non_blocking=True)) * 1e-3) / 1e9
    other = torch.empty_like(dev)
    hbm = 2 * nbytes / (event_ms(lambda: other.copy_(dev)) * 1e-3) / 1e12  # read + write
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    b = torch.randn(4096, 1024, device=device, dtype=torch.bfloat16)
    tflops = 2 * 4096 * 4096 * 1024 / (event_ms(lambda: a @ b) * 1e-3) / 1e12
    return MachineCosts(h2d_gbps=h2d, hbm_tbps=hbm, matmul_tflops=tflops)


def with_int8(w: Workload) -> Workload:
    """The same workload with INT8 K/V codes (scale and bias per page channel: 2·4/block bytes more)."""
    return replace(w, kv_bytes=1.0 + 8.0 / w.block)


def workload_for(pattern, *, batch: int, context: int, head_dim: int, hidden: int, layers: int = 1,
                 kv_int8: bool = False, churn: float = 0.1, kv_bytes: float = 2.0,
                 hidden_bytes: float = 2.0) -> Workload:
    """The ``Workload`` of decoding ``batch`` sequences of ``context`` tokens under ``pattern``: the
    pages a step reads per kv head are the decode kernel's own count of its static blocks (largest
    over kv heads) plus the pattern's top-k. ``kv_bytes`` / ``hidden_bytes``: bytes per element
    of the cache's K/V and of the model's hidden states (``kv_int8`` overrides the first)."""
    read, top = _reads(pattern, context)
    w = Workload(batch=batch, context=max(context, 1), kv_heads=pattern.kv_heads, head_dim=head_dim,
                 block=pattern.block, hidden=hidden, read_pages=read, topk_pages=min(top, read), churn=churn,
                 layers=layers, kv_bytes=kv_bytes, hidden_bytes=hidden_bytes)
    return with_int8(w) if kv_int8 else w


def _reads(pattern, context: int, own: bool = False):
    """(pages one (sequence, kv head) reads in a one-token step at ``context`` tokens, largest
    over kv heads; of them the pattern's top-k); ``own``: and whether every kv head reads the
    query's own block."""
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
    if own:
        return min(static + top, pages), top, bool(tier_reads[..., -1].all())
    return min(static + top, pages), top


def step_pages(pattern, context: int, batch: int = 1) -> int:
    """GPU pages one decode step at ``context`` tokens cannot do without, for ``batch`` sequences:
    per (sequence, kv head) the pages it reads (static blocks at the query and the top-k, as
    ``workload_for`` counts them), the query's own block among them — the page a step opens when
    its token starts a block is that block — or one more where a kv head does not read its own
    block. A tier's GPU pool below this fails such a step (``OutOfPagesError``)."""
    read, _, own = _reads(pattern, context, own=True)
    return batch * pattern.kv_heads * (read + (0 if own else 1))


#: how a tier that can drop chooses where: ``"cost"`` at the host budget the cost model chose
#: (``DropPolicy``, never above ``host_pages``), ``"budget"`` only past ``host_pages``
DROP_MODES = ("cost", "budget")


def drop_mode(drop, *, off: str = "pass drop=False") -> Optional[str]:
    """``drop`` as a mode: ``"cost"`` / ``"budget"`` as given, ``True`` = ``"budget"``, ``False`` =
    None (never drop). Anything else is refused with what ``drop`` takes and how to turn dropping
    off (``off``: the caller's way to say so). Identity, not equality, decides: 0 and 1 are not
    False and True here, since ``drop=0`` reads as "drop past 0 host pages" as easily as "off"."""
    if drop is True:
        return "budget"
    if drop is False:
        return None
    if isinstance(drop, str) and drop in DROP_MODES:
        return drop
    hint = ""
    if isinstance(drop, (int, float)) and not isinstance(drop, bool):
        hint = " drop is a mode, not a page count (the count is host_pages: 0 drops whatever leaves the GPU pool);"
    raise ValueError(f"drop={drop!r} is not a drop mode. drop takes 'cost' (drop where the cost model says, never "
                     f"past host_pages), 'budget' or True (drop only past host_pages);{hint} to turn dropping off "
                     f"{off} (a full host then raises HostFullError)")

_MACHINE = {}


def machine_costs(device) -> MachineCosts:
    """``measure_machine`` once per CUDA device (cached); the model's defaults elsewhere."""
    import torch
    device = torch.device(device)
    if device.type != "cuda":
        return MachineCosts()
    if str(device) not in _MACHINE:
        _MACHINE[str(device)] = measure_machine(device)
    return _MACHINE[str(device)]


@dataclass(frozen=True)
class DropDecision:
    """The drop point a tier applies: ``host_limit`` host pages per layer (of ``host_pages``)
    before the oldest pages are dropped instead of moved down, from ``plan`` (None when the
    model could not plan: then ``host_limit == host_pages`` and ``reason`` says why), planned
    for ``batch`` sequences at ``context`` tokens (the length bucket's end)."""

    host_limit: int
    host_pages: int
    batch: int
    context: int
    plan: Optional[TierPlan]
    reason: str

    def report(self) -> str:
        phase = f"phase {self.plan.phase}" if self.plan is not None else "no plan"
        return (f"in force: drop past {self.host_limit} of {self.host_pages} host pages per layer ({phase}, "
                f"planned for batch {self.batch} at {self.context} tokens): {self.reason}")


class DropPolicy:
    """Applies ``plan``'s choice between phases 2 and 3 to a ``HostTier`` (``drop="cost"``): the
    host pages the plan keeps (``TierPlan.host_bytes`` in pages per layer) become the tier's drop
    threshold, never above the tier's ``host_pages``. Phase 1 or 2, or a plan that fails, keep
    the threshold at ``host_pages``; phase 3 by choice lowers it (to 0 when dropping everything
    off the GPU is cheapest), phase 3 by force leaves it at ``host_pages``.

    The tier asks only when its GPU pool is short (a step that moves pages), never on a quiet
    step; the decision is planned once per (batch, length bucket: four per doubling of the pages
    per sequence, planned at the bucket's end) and shared by every tier of one shape (the
    layers of a model), so a generation plans a handful of times.

    ``costs``: ``MachineCosts`` (default ``machine_costs`` of the pool's device). Without a
    measured recompute (``recompute_page_ms``), ``fit()`` (if given) is asked for one at each
    planning until it returns it (``S2Cache`` fits through the first layer's recompute path,
    ``fit_recompute``); until then the recompute is modelled. ``hidden`` / ``hidden_bytes``: the
    model's width and bytes per hidden-state number (default ``2 · kv_heads · head_dim`` and the
    pool's element size); ``churn``, ``overlap_ms``: as in ``Workload`` / ``plan``."""

    def __init__(self, costs: Optional[MachineCosts] = None, *, hidden: Optional[int] = None,
                 hidden_bytes: Optional[float] = None, churn: float = 0.1, overlap_ms: float = 0.0, fit=None):
        if costs is not None and not isinstance(costs, MachineCosts):
            raise TypeError(f"costs must be a tiering.MachineCosts, got {type(costs).__name__}")
        if hidden is not None and hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {hidden}")
        if not 0.0 <= churn <= 1.0:
            raise ValueError(f"churn must lie in [0, 1], got {churn}")
        if not overlap_ms >= 0:
            raise ValueError(f"overlap_ms must be >= 0, got {overlap_ms}")
        self.costs, self.hidden, self.hidden_bytes = costs, hidden, hidden_bytes
        self.churn, self.overlap_ms, self.fit = churn, overlap_ms, fit
        self._fitted = None
        self._decisions = {}

    def machine(self, device) -> MachineCosts:
        """The costs planned with: given or measured, with the recompute fit once there is one."""
        costs = self.costs if self.costs is not None else machine_costs(device)
        if costs.recompute_measured:
            return costs
        if self._fitted is None and self.fit is not None:
            self._fitted = self.fit()
        return with_recompute(costs, self._fitted) if self._fitted is not None else costs

    @staticmethod
    def bucket(pages: int) -> int:
        """The end of ``pages``' length bucket: rounded up to a multiple of a quarter of its
        power of two (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, ...)."""
        pages = max(int(pages), 1)
        step = 1 << max(pages.bit_length() - 3, 0)
        return -(-pages // step) * step

    def decide(self, tier) -> DropDecision:
        """The decision for ``tier``'s sequences now (planned once per shape, batch and bucket)."""
        t = tier.table
        cache = tier.members[0]
        seqs = list(t._seqs.values())
        batch = max(len(seqs), 1)
        # the KV after the step being planned (its token included), in pages, at its bucket's end
        context = self.bucket(-(-(max((s.length for s in seqs), default=0) + 1) // t.block)) * t.block
        layers = sum(len(x.members) for x in tier.group.tiers) or 1
        kv_bytes = cache._k_all.element_size()
        costs = self.machine(t.device)
        key = (t.pattern.fingerprint(), t.num_pages, tier.host_pages, layers, batch, context, cache.head_dim,
               cache.quantized, kv_bytes, costs)
        got = self._decisions.get(key)
        if got is not None:
            return got
        w = workload_for(t.pattern, batch=batch, context=context, head_dim=cache.head_dim,
                         hidden=self.hidden or 2 * t.kv_heads * cache.head_dim, layers=layers,
                         kv_int8=cache.quantized, churn=self.churn, kv_bytes=kv_bytes,
                         hidden_bytes=self.hidden_bytes or cache.dtype.itemsize)
        per_page = w.page_bytes * layers  # one page of every layer: budgets and host use in these units
        host = tier.host_pages
        try:
            p = plan(w, t.num_pages * per_page, host * per_page, costs, overlap_ms=self.overlap_ms, can_drop=True)
        except ValueError as exc:
            got = DropDecision(host, host, batch, context, None,
                               f"the cost model cannot plan this ({exc}); the tier drops only past host_pages")
        else:
            if p.phase == 3:
                limit = min(host, int(p.host_bytes / per_page + 1e-9))
                why = ("the cost model drops before the host is full" if limit < host
                       else "the host budget forces the drop")
            else:
                limit, why = host, "moving pages to the host is cheaper: nothing is dropped before the host is full"
            got = DropDecision(limit, host, batch, context, p, f"{why}. {p.report()}")
        self._decisions[key] = got
        return got
