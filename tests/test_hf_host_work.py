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
