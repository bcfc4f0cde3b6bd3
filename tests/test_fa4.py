"""The `fa4` backend's decomposition of the layout into causal varlen sequences, checked without FlashAttention-4:
the gather index and sequence lengths against the layout's definition, and the decomposition run through the plain
torch meaning of the varlen call (``varlen_causal_reference``) against float64 attention on the layout's mask,
output and all three gradients, also with a sliding window, a soft-cap and the lse that sinks read. The real kernel
is held to float64 on the GPU (tests/gpu/test_fa4_gpu.py)."""

from __future__ import annotations

import concurrent.futures
import random

import pytest
import torch
from conftest import random_layout

from prefix_attn import PrefixLayout, prefix_attention
from prefix_attn.fa4 import fa4_prefix_attention, varlen_causal_reference, varlen_plan
from prefix_attn.reference import attention_math, reference_attention


def _reference_varlen(q, k, v, cu_q, cu_k, max_len, scale, window, softcap):
    return varlen_causal_reference(q, k, v, cu_q, cu_k, scale, window, softcap, return_lse=True)


def test_plan_follows_the_layout():
    layout = PrefixLayout.from_lengths([3, 0, 2], [[2, 1, 4], [5], [1, 1]])
    plan = varlen_plan(layout)
    # Sequences in row order: doc 0 prefix+b0 (5), b1 (1), b2 (4); doc 1 b0 (5); doc 2 prefix+b0 (3), b1 (1).
    assert plan.cu_q.tolist() == [0, 5, 6, 10, 15, 18, 19]
    assert plan.cu_k.tolist() == [0, 5, 9, 16, 21, 24, 27]
    assert plan.kv_index.tolist() == [0, 1, 2, 3, 4,  0, 1, 2, 5,  0, 1, 2, 6, 7, 8, 9,  10, 11, 12, 13, 14,
                                      15, 16, 17,  15, 16, 18]
    assert plan.kv_index.numel() == layout.unshared_tokens and plan.max_len == layout.max_doc_span


@pytest.mark.parametrize("seed", range(3))
def test_decomposition_equals_the_layout_mask(seed):
    rng = random.Random(seed)
    layout = random_layout(rng, tokens=300, device="cpu")
    hq, hkv, d = [(4, 2, 16), (3, 3, 8), (6, 2, 32)][seed]
    g = torch.Generator().manual_seed(seed)
    q, k, v = [torch.randn(layout.total_tokens, h, d, generator=g, dtype=torch.float64).requires_grad_()
               for h in (hq, hkv, hkv)]
    do = torch.randn(layout.total_tokens, hq, d, generator=g, dtype=torch.float64)
    got = fa4_prefix_attention(q, k, v, layout, varlen=_reference_varlen)
    want = attention_math(q, k, v, layout)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), do), torch.autograd.grad(want, (q, k, v), do)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_asking_for_fa4_where_it_does_not_run_is_one_clear_error():
    layout = PrefixLayout.from_lengths([2], [[1, 1]])
    x = torch.randn(layout.total_tokens, 2, 16)
    with pytest.raises(ValueError, match="attention backend 'fa4' does not run here: .*(not installed|CUDA GPU)"):
        prefix_attention(x, x, x, layout, backend="fa4")


@pytest.mark.parametrize("opts", [dict(window=5), dict(softcap=2.0), dict(window=9, softcap=3.0)],
                         ids=["window", "softcap", "both"])
def test_decomposition_with_options_equals_the_layout_mask(opts):
    """A window of W positions is the varlen call's bottom-right-aligned window of W keys in every sequence (the
    layout's windows bite: prefixes and branches several times W long), and the soft-cap is the call's. Output and
    lse (what the sink epilogue, ``ops.apply_sinks``, reads) against the reference backend's, and the gradients of
    q, k, v through both, in float64."""
    layout = PrefixLayout.from_lengths([17, 0, 3], [[6, 1, 12], [9], [2, 20]])
    g = torch.Generator().manual_seed(7)
    q, k, v = [torch.randn(layout.total_tokens, h, 8, generator=g, dtype=torch.float64).requires_grad_()
               for h in (4, 2, 2)]
    got = fa4_prefix_attention(q, k, v, layout, return_lse=True, varlen=_reference_varlen, **opts)
    want = reference_attention(q, k, v, layout, return_lse=True, **opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    do, dlse = torch.randn_like(want[0]), torch.randn_like(want[1])
    for a, b in zip(torch.autograd.grad(got, (q, k, v), (do, dlse)), torch.autograd.grad(want, (q, k, v), (do, dlse))):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def _stand_in_fa4(calls):
    """A ``flash_attn.cute.interface`` whose private forward and backward (the two entry points the custom ops call)
    compute with ``varlen_causal_reference``, taking FlashAttention-4's arguments as it names them."""
    import types

    def window_of(left):
        return None if left is None else left + 1  # window_size_left counts the keys before the query

    def fwd(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, softcap,
            window_size_left, return_lse):
        assert causal and return_lse and max_seqlen_q == max_seqlen_k
        out, lse = varlen_causal_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                           window_of(window_size_left), softcap, return_lse=True)
        return out, lse, None, None, None

    def bwd(q, k, v, out, dout, lse, softmax_scale, causal, softcap, *, window_size_left, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, dlse):
        calls.append(dlse)

        def vjp():
            xs = [x.detach().requires_grad_() for x in (q, k, v)]
            o, lse_ = varlen_causal_reference(*xs, cu_seqlens_q, cu_seqlens_k, softmax_scale,
                                              window_of(window_size_left), softcap or None, return_lse=True)
            return torch.autograd.grad((o, lse_), xs, (dout, torch.zeros_like(lse_) if dlse is None else dlse))

        # A custom op's body runs below autograd (thread-local state); a fresh thread has autograd back.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(vjp).result()

    return types.SimpleNamespace(_flash_attn_fwd=fwd, _flash_attn_bwd=bwd)


@pytest.mark.parametrize("opts,use_lse", [({}, False), (dict(window=5, softcap=2.0), True)], ids=["plain", "options"])
def test_custom_ops_pass_fa4_its_arguments(monkeypatch, opts, use_lse):
    """The custom ops around FlashAttention-4's entry points (argument order, window_size_left = W - 1, softcap, the
    lse's gradient as dlse, and none when the lse is unused) with a stand-in that computes in float64."""
    import sys
    import types

    calls = []
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", types.ModuleType("flash_attn.cute"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute.interface", _stand_in_fa4(calls))
    layout = PrefixLayout.from_lengths([17, 0, 3], [[6, 1, 12], [9], [2, 20]])
    g = torch.Generator().manual_seed(3)
    q, k, v = [torch.randn(layout.total_tokens, h, 8, generator=g, dtype=torch.float64).requires_grad_()
               for h in (4, 2, 2)]
    got = fa4_prefix_attention(q, k, v, layout, return_lse=True, **opts)
    want = reference_attention(q, k, v, layout, return_lse=True, **opts)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    do, dlse = torch.randn_like(want[0]), torch.randn_like(want[1])
    outs, grads_out = ((got[0], got[1]), (do, dlse)) if use_lse else ((got[0],), (do,))
    ref_outs = (want[0], want[1]) if use_lse else (want[0],)
    for a, b in zip(torch.autograd.grad(outs, (q, k, v), grads_out), torch.autograd.grad(ref_outs, (q, k, v),
                                                                                       grads_out)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    assert (calls[-1] is None) != use_lse
