"""ALISA on the GPU (bf16): the INT8 decode kernel against the float32 reference over the
dequantised K/V, and the host tier (pinned memory, side-stream copies) against the all-resident
cache. Outputs are poisoned with NaN before each call."""
from __future__ import annotations

import pytest
import torch

import s2dsl
from s2dsl.runtime.decode import cached_attention, paged_attention
from s2dsl.runtime.host_tier import HostTier
from s2dsl.runtime.kv_cache import PagedKVCache, dense_pattern
from s2dsl.runtime.quant import QuantizedPages, dequantize_pages

from serving_helpers import decode_steps

pytestmark = pytest.mark.gpu
SWA = s2dsl.parse("pattern p { block = 64 heads = 32 kv_heads = 8 heads * { window 4 sink 1 topk 4 recent 8 } }")["p"]
STATIC = s2dsl.local_stride(block=64, local_blocks=4, vert_stride=8, heads=32, kv_heads=8)
DENSE = dense_pattern(32, 8, 64)
D = 128


def _data(pattern, n, batch):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [[torch.randn(1, h, n, D, device="cuda", generator=g, dtype=torch.bfloat16)
             for h in (pattern.heads, pattern.kv_heads, pattern.kv_heads)] for _ in range(batch)]


@pytest.mark.parametrize("pattern", [STATIC, DENSE], ids=["static", "dense"])
def test_gpu_int8_decode_matches_float32_reference(pattern):
    n = 2000
    data = _data(pattern, n, 2)
    cache = PagedKVCache(pattern, num_pages=640, head_dim=D, dtype=torch.bfloat16, device="cuda",
                         kv_dtype=torch.int8)
    ids = [cache.add_sequence() for _ in data]
    for s, (q, k, v) in zip(ids, data):
        cached_attention(cache, [s], q[:, :, :n - 1], k[:, :, :n - 1], v[:, :, :n - 1])
    q, k, v = (torch.cat([d[j][:, :, n - 1:] for d in data]) for j in range(3))
    cache.append(ids, k, v)
    for splits in (1, 4):
        out = torch.full_like(q, float("nan"))
        paged_attention(q, cache, ids, out=out, n_splits=splits)
        for b, s in enumerate(ids):
            kd, vd = cache.gather(s)
            ref = s2dsl.reference_attention(q[b:b + 1].float(), kd[None].float(), vd[None].float(), pattern)
            err = ((out[b:b + 1].float() - ref).norm() / ref.norm()).item()
            assert err < 2e-2, (splits, err)
            exact = s2dsl.reference_attention(q[b:b + 1].float(), data[b][1].float(), data[b][2].float(), pattern)
            print(f"{pattern.name}: INT8 output vs 16-bit K/V, relative {((ref - exact).norm() / exact.norm()).item():.2e}")


@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["bf16", "int8"])
def test_gpu_host_tier_is_lossless(kv_dtype):
    data = _data(SWA, 1600, 2)
    resident = PagedKVCache(SWA, num_pages=512, head_dim=D, dtype=torch.bfloat16, device="cuda", kv_dtype=kv_dtype)
    ref, _ = decode_steps(resident, data, 1100, 500, alternate=True)
    # the prompt's 18 blocks per (sequence, kv head) fit, the rest moves
    tiered = PagedKVCache(SWA, num_pages=2 * 8 * 19, head_dim=D, dtype=torch.bfloat16, device="cuda",
                          kv_dtype=kv_dtype)
    tier = HostTier(tiered.table, host_pages=2 * 8 * 26)
    tier.attach(tiered)
    out, _ = decode_steps(tiered, data, 1100, 500, alternate=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out, ref)
    assert tier.moved_up > 0 and tier.moved_down > 0


def _tiny_llama_cuda():
    from s2dsl.integrations import hf
    from serving_helpers import tiny_llama
    plan = ("pattern swa { block = 16 heads = 4 kv_heads = 2 causal heads * { window 1 topk 2 recent 3 } }\n"
            "model tiny { layers = 2 rest -> swa }")
    return tiny_llama(plan, seed=1, attn=hf.ATTN_IMPLEMENTATION).to("cuda", torch.bfloat16), hf


def test_gpu_recomputed_kv_match_what_the_layer_wrote_in_bf16():
    """bf16 recompute from the logged hidden states against the pages the prefill and decode steps
    wrote: a product over a different set of rows may round differently, by about one bf16 step."""
    model, hf = _tiny_llama_cuda()
    ids = torch.randint(0, 100, (2, 45), device="cuda", generator=torch.Generator(device="cuda").manual_seed(6))
    cache = hf.S2Cache(model, max_length=60, batch_size=2, gpu_pages=64, host_pages=0, recompute="hidden")
    with torch.no_grad():
        model(ids[:, :30], past_key_values=cache)
        for n in range(30, 45):
            model(ids[:, n:n + 1], past_key_values=cache)
    worst = exact = 0
    for p in cache.paged:
        tables = p.table.tables
        slot, g, j = torch.nonzero(tables >= 0).unbind(1)
        k, v = p.table.tier._recompute[id(p)](slot.cpu(), g.cpu(), j.cpu())
        pages = tables[slot, g, j].long()
        valid = (torch.arange(16, device="cuda").view(1, -1) + j.view(-1, 1) * 16 < 45).unsqueeze(-1)
        for got, pool in ((k, p.k_pages), (v, p.v_pages)):
            ref = pool[pages].float()
            diff = torch.where(valid, (got.float() - ref).abs(), 0)
            # within two bf16 steps of each element (2^-7 relative), and mostly equal
            assert bool((diff <= ref.abs() * 2 ** -6 + 1e-6).all()), diff.max().item()
            worst = max(worst, diff.max().item())
            exact += int((diff[valid.expand_as(diff)] == 0).sum())
    print(f"bf16 recompute: largest K/V difference {worst:.3e}; {exact} elements bit-identical")


def test_gpu_dropped_page_selected_again_gives_the_resident_logits():
    model, hf = _tiny_llama_cuda()
    ids = torch.randint(0, 100, (2, 51), device="cuda", generator=torch.Generator(device="cuda").manual_seed(7))
    caches = [hf.S2Cache(model, max_length=60, batch_size=2),
              hf.S2Cache(model, max_length=60, batch_size=2, gpu_pages=12, host_pages=0, recompute="hidden")]
    with torch.no_grad():
        for cache in caches:
            model(ids[:, :40], past_key_values=cache)
            for n in range(40, 50):
                model(ids[:, n:n + 1], past_key_values=cache)
        tier = caches[1].paged[0].table.tier
        slot, g, j = torch.nonzero(tier.dropped).unbind(1)
        assert slot.numel() == 4, tier.report()
        logits = []
        for cache in caches:
            for p in cache.paged:
                p._topk_state.selection.fill_(-1)
                p._topk_state.selection[slot.cuda(), g.cuda(), 0] = j.cuda().to(torch.int32)
            out = torch.full((2, 1, model.config.vocab_size), float("nan"), device="cuda")
            out.copy_(model(ids[:, 50:51], past_key_values=cache).logits.float())
            logits.append(out)
    torch.cuda.synchronize()
    assert tier.recomputed == 4, tier.report()
    assert torch.isfinite(logits[1]).all()
    change = ((logits[1] - logits[0]).abs().max() / logits[0].std()).item()
    print(f"bf16 logits after reading 4 recomputed pages: largest change {change:.2e} of their std")
    assert change < 2e-2


def test_gpu_int8_decode_write_kernel_matches_the_torch_quantiser(monkeypatch):
    """bf16 decode writes into INT8 pages by the generated kernel against the torch ops it
    replaced (same arithmetic; the GPU compiler may fuse a multiply-add, so a code may differ by
    one step where a value sits on a rounding edge)."""
    from s2dsl.runtime import kv_cache
    g = torch.Generator(device="cuda").manual_seed(2)
    k = torch.randn(4, 8, 300, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(4, 8, 300, D, device="cuda", generator=g, dtype=torch.bfloat16)
    caches = []
    for fused in (False, True):
        real = kv_cache.write_decode_tokens
        with monkeypatch.context() as m:
            m.setattr(kv_cache, "write_decode_tokens", lambda *a, _f=fused: _f and real(*a))
            cache = PagedKVCache(STATIC, num_pages=4 * 8 * 6, head_dim=D, dtype=torch.bfloat16, device="cuda",
                                 kv_dtype=torch.int8, evict=False)
            ids = [cache.add_sequence() for _ in range(4)]
            cache.append(ids, k[:, :, :100], v[:, :, :100])
            for pos in range(100, 300):
                cache.append(ids, k[:, :, pos:pos + 1], v[:, :, pos:pos + 1])
        caches.append(cache)
    torch.cuda.synchronize()
    ref, got = caches
    assert torch.equal(ref.table.tables, got.table.tables)
    for a, b in ((ref._k_all, got._k_all), (ref._v_all, got._v_all)):
        assert (a.int() - b.int()).abs().max().item() <= 1
        assert (a != b).float().mean().item() < 1e-3
    # scales to float32 rounding; a bias (-z/λ) near zero differs relatively but not against the
    # step it offsets: at most a hundredth of the page's quantisation step (the H200 showed 5e-4)
    for sc, bi in ((0, 1), (2, 3)):
        torch.testing.assert_close(got._qparams[sc], ref._qparams[sc], rtol=1e-5, atol=1e-7)
        assert ((got._qparams[bi] - ref._qparams[bi]).abs() <= 1e-2 * ref._qparams[sc] + 1e-7).all()
    # what the kernels read: the dequantised pages agree within one quantisation step
    for codes, sc, bi in ((lambda c: c._k_all, 0, 1), (lambda c: c._v_all, 2, 3)):
        deq = [dequantize_pages(QuantizedPages(codes(c), c._qparams[sc], c._qparams[bi]))
               for c in (ref, got)]
        assert ((deq[0] - deq[1]).abs() <= 1.01 * ref._qparams[sc].unsqueeze(1) + 1e-6).all()


def _graph_tokens(model, ids, cache, steps: int = 60):
    """Greedy tokens of ``model`` after prefilling ``ids`` into ``cache``: the prefill's, then
    ``steps`` captured decode steps (``decode_graph``)."""
    with torch.no_grad():
        tok = model(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        step = cache.decode_graph(model)
        out = [tok]
        for _ in range(steps):
            tok = step(tok)[:, -1:].argmax(-1)
            out.append(tok)
    torch.cuda.synchronize()
    return torch.cat(out, 1)


@pytest.mark.parametrize("host_pages,recompute,overlap", [(24, None, True), (24, None, False), (0, "hidden", True)],
                         ids=["host", "host-copies-before-replay", "drop"])
def test_gpu_captured_steps_over_a_tier_move_and_recompute_pages_losslessly(host_pages, recompute, overlap,
                                                                             monkeypatch):
    """CUDA-graph decode steps (decode_graph, captured) over a tiered cache under a relative-stride
    pattern, whose reads come back at block crossings: pages move up from pinned memory (or are
    recomputed) in the host part before each replay; the tokens are the resident graph steps'.
    With ``graph_overlap`` each captured layer waits for its own copies (an external event wait
    node), without it the replay waits for all of them first."""
    from s2dsl.integrations import hf
    from s2dsl.runtime.host_tier import HostTier
    monkeypatch.setattr(HostTier, "graph_overlap", overlap)
    from serving_helpers import tiny_llama
    plan = ("pattern rel { block = 16 heads = 4 kv_heads = 2 causal heads * { window 1 sink 1 stride 2 relative } }\n"
            "model tiny { layers = 2 rest -> rel }")
    # float32 where pages are recomputed: a bf16 product over other rows may round a K/V element
    # differently, and a random model's near-tied logits turn that into a different token
    dtype = torch.float32 if recompute else torch.bfloat16
    model = tiny_llama(plan, seed=1, attn=hf.ATTN_IMPLEMENTATION).to("cuda", dtype)
    ids = torch.randint(0, 100, (2, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))

    ref = _graph_tokens(model, ids, hf.S2Cache(model, max_length=110, batch_size=2))
    cache = hf.S2Cache(model, max_length=110, batch_size=2, gpu_pages=16, host_pages=host_pages, recompute=recompute)
    out = _graph_tokens(model, ids, cache)
    tier = cache.paged[0].table.tier
    assert (tier.recomputed if recompute else tier.moved_up) > 0, tier.report()
    assert torch.equal(out, ref)
    # the captured step waits per layer exactly when overlap is on
    assert all(p.table.tier._graph_waits == overlap for p in cache.paged)


@pytest.mark.parametrize("slow_link", [True, False], ids=["slow-link", "measured"])
def test_gpu_tiers_drop_where_the_cost_model_says(slow_link):
    """drop="cost" on the GPU under captured steps: with a slow modelled link the tiers drop
    everything that leaves the GPU while the host has room; with the machine's measured link and
    the recompute fitted through the cache's own path the tiers apply whatever the model chose.
    Either way the tokens are the resident graph steps' and debug_report states the applied limit."""
    from s2dsl.integrations import hf
    from s2dsl.runtime.tiering import MachineCosts
    from serving_helpers import tiny_llama
    plan = ("pattern swa { block = 16 heads = 4 kv_heads = 2 causal heads * { window 1 topk 2 recent 3 } }\n"
            "model tiny { layers = 2 rest -> swa }")
    model = tiny_llama(plan, seed=1, attn=hf.ATTN_IMPLEMENTATION).to("cuda", torch.float32)
    ids = torch.randint(0, 100, (2, 40), device="cuda", generator=torch.Generator(device="cuda").manual_seed(5))

    ref = _graph_tokens(model, ids, hf.S2Cache(model, max_length=110, batch_size=2))
    costs = MachineCosts(h2d_gbps=1e-6, recompute_page_ms=1e-3) if slow_link else None
    cache = hf.S2Cache(model, max_length=110, batch_size=2, gpu_pages=12, host_pages=24, recompute="hidden",
                       costs=costs)
    out = _graph_tokens(model, ids, cache)
    assert torch.equal(out, ref)
    tiers = [p.table.tier for p in cache.paged]
    applied = [t.decision for t in tiers]  # at each tier's last short step
    assert all(d is not None for d in applied)
    assert all(t.host_pages_in_use <= d.host_limit for t, d in zip(tiers, applied)), [t.report() for t in tiers]
    report = cache.debug_report()  # the decision for the current length bucket, as the tiers would apply it
    print(report)
    limit = tiers[0].decision.host_limit
    assert f"drop past {limit} of 24 host pages per layer" in report
    if slow_link:
        assert limit == 0 and all(t.dropped_pages > 0 and t.moved_down == 0 for t in tiers), report
    else:
        assert "measured on this machine" in report, report


@pytest.mark.parametrize("kv_dtype", [None, torch.int8], ids=["bf16", "int8"])
def test_gpu_auto_split_reads_the_device_and_its_headroom_covers_a_prefill(kv_dtype):
    """gpu_pages="auto" on a real device: the free memory is read (phase 1 for a cache this small),
    and the headroom estimated for a forward of batch x prompt tokens is at least what the first
    prefill's forward takes beside the cache (the peak over what stays allocated after it: pools,
    tables and logits), on a Llama of 4 layers, hidden 1024, MLP 2816, 16 q / 4 kv heads of 64."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from s2dsl.integrations import hf
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, head_dim=64, max_position_embeddings=8192)
    model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    plan = s2dsl.parse("pattern swa { block = 64 heads = 16 kv_heads = 4 causal "
                       "heads * { window 4 sink 1 topk 4 recent 8 } }\nmodel m { layers = 4 rest -> swa }")
    hf.apply(model, plan, model_name="m")
    batch, prompt = 4, 4096
    cache = hf.S2Cache(model, max_length=prompt + 64, batch_size=batch, gpu_pages="auto", kv_dtype=kv_dtype,
                       prefill_chunk_size=0)
    assert cache.split.phase == 1, cache.split.report()
    assert cache.debug_report().startswith("split (auto): phase 1: need ")
    ids = torch.randint(0, 32000, (batch, prompt), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, logits_to_keep=1).logits
    torch.cuda.synchronize()
    taken = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
    room = hf.activation_headroom(model, batch, prompt)
    print(f"prefill {batch} x {prompt}: forward took {taken / 2 ** 20:.1f} MiB beside the cache; headroom "
          f"{room / 2 ** 20:.1f} MiB ({(room - 256 * 2 ** 20) / 2 ** 20:.1f} MiB without the fixed part)")
    assert logits.shape == (batch, 1, 32000) and all(p.table.tier is None for p in cache.paged)
    assert taken <= room
    # and not grossly inflated (an inflated headroom sends caches that fit into phase 2 for nothing)
    assert room - 256 * 2 ** 20 <= 4 * taken
