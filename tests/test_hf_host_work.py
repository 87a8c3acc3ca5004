"""Host work of HF decode steps through S2Cache: no device reads, no host data copied in.

The kernels are stubbed (what is counted is what the host does around them); the logits of
such steps are meaningless and unused. On a GPU, ``test_gpu_eager_decode_never_syncs`` runs
the real kernels under CUDA's own sync detector.
"""
from __future__ import annotations

import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from s2dsl.integrations import hf  # noqa: E402
from serving_helpers import HostWork, stub_decode_kernels, tiny_llama  # noqa: E402

PLAN = """
pattern sparse { block = 16  heads = 4  kv_heads = 2  causal  heads * { window 2  stride 3 offset h } }
model tiny { layers = 4  every 2 -> dense  rest -> sparse }
"""


def test_decode_steps_read_nothing_from_the_device(monkeypatch):
    """After the prefill, a decode forward of a 4-layer model (two page tables: sparse and
    dense) reads no device value in s2dsl's code or HF's, across block boundaries."""
    model = tiny_llama(PLAN, layers=4, attn=hf.ATTN_IMPLEMENTATION)
    stub_decode_kernels(monkeypatch)
    cache = hf.S2Cache(model, max_length=120, batch_size=2)
    ids = torch.randint(1, 100, (2, 30))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)  # the prefill kernel (interpreter)
        tok = torch.ones(2, 1, dtype=torch.long)
        model(tok, past_key_values=cache, use_cache=True)  # the batch's slot tensor is made once
        for _ in range(40):
            with HostWork(monkeypatch) as work:
                model(tok, past_key_values=cache, use_cache=True)
            assert not work.reads, f"a decode forward read the device or copied host data: {dict(work.reads)}"
    assert cache.get_seq_length() == 30 + 41


@pytest.mark.gpu
def test_gpu_eager_decode_never_syncs():
    """bf16 on the GPU: eager decode forwards through S2Cache under torch.cuda's sync detector."""
    if os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_llama(PLAN.replace("block = 16", "block = 64"), layers=4, attn=hf.ATTN_IMPLEMENTATION)
    model.to("cuda", torch.bfloat16)
    # a pool with room to spare: the host reads the free count only when a step might not fit
    cache = hf.S2Cache(model, max_length=2000, batch_size=3)
    ids = torch.randint(1, 100, (3, 200), device="cuda")
    tok = torch.ones(3, 1, dtype=torch.long, device="cuda")
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        model(tok, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(150):  # crosses block boundaries (new pages) and eviction bounds
                logits = model(tok, past_key_values=cache, use_cache=True).logits
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(logits.float()).all()


def test_device_ops_per_layer_per_step(monkeypatch):
    """The device ops of s2dsl's part of an eager decode step, per layer: the first layer of a
    page table plans the step (a dozen small ops; more when a sequence starts a block or an
    eviction bound crosses one), every other layer only writes its K/V and launches the
    kernel. Counted with the kernels stubbed (the launch itself adds the kernel, and the
    split-KV partials and combine where the context is long); a regression fails here."""
    from collections import Counter
    model = tiny_llama(PLAN, layers=4, attn=hf.ATTN_IMPLEMENTATION)
    stub_decode_kernels(monkeypatch)
    cache = hf.S2Cache(model, max_length=200, batch_size=2)
    ids = torch.randint(1, 100, (2, 30))
    layer_cls = type(cache.layers[0])
    per_call, reads = [], Counter()
    real = layer_cls._attend

    def counted(self, *args, **kwargs):
        with HostWork(monkeypatch) as work:
            out = real(self, *args, **kwargs)
        per_call.append((self.paged.table.plan.consumers.__len__() == 1, sum(work.ops.values())))
        reads.update(work.reads)
        return out

    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        tok = torch.ones(2, 1, dtype=torch.long)
        model(tok, past_key_values=cache, use_cache=True)
        monkeypatch.setattr(layer_cls, "_attend", counted)
        for _ in range(40):  # 40 tokens: blocks of 16 start, eviction bounds cross
            model(tok, past_key_values=cache, use_cache=True)
    planning = [n for first, n in per_call if first]
    others = [n for first, n in per_call if not first]
    assert not reads, dict(reads)
    assert len(planning) == 2 * 40 and len(others) == 2 * 40  # two page tables (sparse, dense) of two layers
    # the other layers: the output buffer, the K and V writes, the log-sum-exp buffer
    assert max(others) <= 4, sorted(Counter(others).items())
    # those four and the plan: 12 ops in most steps (positions from the device lengths, each token's
    # row in the pools, the new lengths), 26 when a sequence starts a block (taking pages)
    assert sorted(planning)[len(planning) // 2] <= 16 and max(planning) <= 30, sorted(Counter(planning).items())
