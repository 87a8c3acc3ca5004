"""Helpers shared by the serving tests: a tiny Llama under an s2dsl plan, and a decode loop
over a paged cache."""
from __future__ import annotations

import torch

import s2dsl
from s2dsl.runtime.decode import cached_attention


def tiny_llama(plan: str, *, seed: int = 0, layers: int = 2, model_name: str = "tiny", attn: str = ""):
    """A random 2-layer Llama (4 q / 2 kv heads, hidden 64) with ``plan``'s patterns applied;
    ``attn``: an attention implementation to switch to (default: the model's own)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from s2dsl.integrations import hf
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    m = LlamaForCausalLM(config).eval()
    hf.apply(m, s2dsl.parse(plan), model_name=model_name)
    if attn:
        m.set_attn_implementation(attn)
    return m


def decode_steps(cache, data, prompt, steps, alternate=False):
    """Prefill each sequence, then decode them together, or (``alternate``) one sequence per step:
    a step then reads none of the other sequence's pages, which a tight pool moves down.
    ``data``: per sequence (q, k, v). Returns the outputs of the steps and the sequence ids."""
    ids = [cache.add_sequence() for _ in data]
    for s, (q, k, v) in zip(ids, data):
        cached_attention(cache, [s], q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    outs = []
    for pos in range(prompt, prompt + steps):
        rows = [[i] for i in range(len(data))] if alternate else [list(range(len(data)))]
        step = []
        for r in rows:
            q, k, v = (torch.cat([data[i][j][:, :, pos:pos + 1] for i in r]) for j in range(3))
            step.append(cached_attention(cache, [ids[i] for i in r], q, k, v))
        outs.append(torch.cat(step))
    return torch.cat(outs, 2), ids


class HostWork:
    """Counts, while active, what a step does on the host that the device would feel: reads
    of device values (``item``, ``int()``, ``bool()``, ``tolist``, ``cpu``, ``numpy``), host
    data turned into tensors (``torch.tensor``: a copy to the device, which syncs from pageable
    memory), and the device ops dispatched (each one a kernel launch on a GPU; views excluded)."""

    READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        from collections import Counter
        from torch.utils._python_dispatch import TorchDispatchMode
        self.reads, self.ops = Counter(), Counter()
        counter = self

        class Ops(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func.overloadpacket.__name__)
                if name == "_local_scalar_dense":
                    counter.reads["_local_scalar_dense"] += 1
                elif name == "lift_fresh":
                    counter.reads["torch.tensor"] += 1
                elif not (func.is_view or name in ("view", "_unsafe_view", "detach", "alias")):
                    counter.ops[name] += 1
                return func(*args, **(kwargs or {}))

        self._mode = Ops()
        self._monkeypatch = monkeypatch

    def __enter__(self):
        self._ctx = self._monkeypatch.context()
        m = self._ctx.__enter__()
        for name in self.READS:
            orig = getattr(torch.Tensor, name)

            def counted(t, *a, _orig=orig, _name=name, **k):
                self.reads[_name] += 1
                return _orig(t, *a, **k)
            m.setattr(torch.Tensor, name, counted)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._ctx.__exit__(*exc)


def stub_decode_kernels(monkeypatch):
    """Make the decode path's kernel lookups return a module whose launch does nothing, and the
    K/V write kernel's launches nothing (host work is what is measured; the Triton interpreter
    would read tensors itself)."""
    from s2dsl.runtime import decode

    class _Stub:
        def launch(self, *args, **kwargs):
            pass

    real = decode._kernel_for

    def fake(cache, compute, d, q_len, device):
        spec, _ = real(cache, compute, d, q_len, device)
        return spec, _Stub()
    monkeypatch.setattr(decode, "_kernel_for", fake)
    # the K/V write kernel too (one launch on a GPU; the interpreter would add its own tensor ops)
    from s2dsl.runtime import kv_write

    class _NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    monkeypatch.setattr(kv_write, "kv_rows_kernel", _NoLaunch())


def replay_selection(pattern, group_sel, n_rows):
    """The per-q-head selection a decode step used, as the reference takes it: (1, heads,
    n_rows, K_max), q head h taking the first K_h blocks of its kv head's row of ``group_sel``."""
    from s2dsl.codegen.lower import lower
    ks = [p.topk for p in lower(pattern).params]
    sel = torch.full((1, pattern.heads, n_rows, max(ks)), -1, dtype=torch.int32)
    for h, kh in enumerate(ks):
        if kh:
            sel[0, h, :, :kh] = group_sel[pattern.kv_head_of(h), :kh]
    return sel
