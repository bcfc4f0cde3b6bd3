"""GPU tests of the `triton` backend (bf16/fp16, head dims 64/128, GPU tile sizes) and of `flex`, against float64.

Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu -q``. The default (CPU) run deselects them.
Tolerance, derived rather than tuned: kernel error vs float64 <= 2 x the error of ``attention_math`` run by torch in the
same dtype on the same GPU, plus four fp32 epsilons relative to max(|truth|, |dO|). With attention options (a sliding
window, a soft-cap, sinks: ``conftest.random_options``) the same, the sinks' gradient included.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import random_layout, random_options
from prefix_attn import PrefixLayout, prefix_attention
from prefix_attn.reference import attention_math

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def _err(a, t, scale):
    return ((a.double() - t).norm() / max(t.norm().item(), scale)).item()


def _check(fn, layout, hq, hkv, d, dtype, seed, label="", window=None, softcap=None, sinks=False):
    """``fn(q, k, v)`` (``fn(q, k, v, sinks)`` with ``sinks``) against float64, under the options given."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    T = layout.total_tokens
    q = torch.randn(T, hq, d, device=DEV, generator=g).to(dtype)
    k = torch.randn(T, hkv, d, device=DEV, generator=g).to(dtype)
    v = torch.randn(T, hkv, d, device=DEV, generator=g).to(dtype)
    do = torch.randn(T, hq, d, device=DEV, generator=g).to(dtype)
    inputs = [q, k, v] + ([(torch.randn(hq, device=DEV, generator=g) * 2 + 3).to(dtype)] if sinks else [])

    def run(f, cast):
        xs = [x.detach().to(cast).requires_grad_() for x in inputs]
        o = f(*xs)
        grads = torch.autograd.grad(o, xs, do.to(cast))
        return [o.detach(), *grads]

    def math(*xs):
        return attention_math(*xs[:3], layout, window=window, softcap=softcap, sinks=xs[3] if sinks else None)

    got = run(fn, dtype)
    truth = run(math, torch.float64)
    same = run(math, dtype)
    scale = do.double().norm().item()
    floor = 4 * torch.finfo(torch.float32).eps
    for name, x, t, s in zip(("out", "dq", "dk", "dv", "dsinks"), got, truth, same):
        assert torch.isfinite(x).all(), f"{label} {name}: non-finite"
        err, ref = _err(x, t, scale), _err(s, t, scale)
        assert err <= 2 * ref + floor, f"{label} {name}: error {err:.3e} > 2 x torch {dtype} error {ref:.3e}"


def _triton(layout, **kw):
    from prefix_attn.triton import triton_prefix_attention

    return lambda q, k, v: triton_prefix_attention(q, k, v, layout, **kw)


def _with_options(layout, backend, window=None, softcap=None, sinks=False):
    """``prefix_attention`` on ``backend`` with the options (taking the sinks as a fourth input)."""
    if sinks:
        return lambda q, k, v, s: prefix_attention(q, k, v, layout, backend=backend, window=window, softcap=softcap,
                                                    sinks=s)
    return lambda q, k, v: prefix_attention(q, k, v, layout, backend=backend, window=window, softcap=softcap)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)],
                         ids=["d128-bf16", "d64-bf16", "d128-fp16"])
def test_random_layouts(seed, d, dtype):
    layout = random_layout(random.Random(seed), tokens=random.Random(seed).choice([700, 1500, 2600]), device=DEV)
    hq, hkv = [(8, 2), (4, 4), (6, 3)][seed % 3]
    _check(_triton(layout), layout, hq, hkv, d, dtype, seed, label=f"seed {seed}")


AWKWARD = [
    ("one_token", [0], [[1]]),
    ("only_self", [0] * 300, [[1]] * 300),
    ("tile_pm1", [127, 128, 129, 63, 65], [[127, 128, 129], [1], [64], [63, 65, 1], [2]]),
    ("tiny_docs", [1, 0, 2, 3] * 40, [[1, 2], [3], [1, 1, 1], [2]] * 40),
    ("eight_branches", [700], [[1, 64, 129, 300, 2, 127, 128, 5]]),
]


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)],
                         ids=["d128-bf16", "d64-bf16", "d128-fp16"])
def test_random_layouts_with_options(seed, d, dtype):
    rng = random.Random(1000 + seed)
    layout = random_layout(rng, tokens=rng.choice([700, 1500, 2600]), device=DEV)
    opts = random_options(rng)
    hq, hkv = [(8, 2), (4, 4), (6, 3), (8, 1)][seed % 4]
    _check(_with_options(layout, "triton", **opts), layout, hq, hkv, d, dtype, seed, label=f"seed {seed} {opts}",
           **opts)


# Each option alone and all together, at windows of gpt-oss (128) and Gemma 3 (1024) over prefixes longer than them.
OPTION_CASES = [dict(window=128), dict(window=1024), dict(window=1), dict(softcap=50.0), dict(softcap=2.0),
                dict(sinks=True), dict(window=128, softcap=5.0, sinks=True)]


@pytest.mark.parametrize("opts", OPTION_CASES, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("backend", ["triton", "flex"])
def test_options_on_long_prefixes(opts, backend):
    layout = PrefixLayout.from_lengths([1500, 300, 0], [[200, 129, 1, 64], [127, 128], [700]], device=DEV)
    _check(_with_options(layout, backend, **opts), layout, 8, 2, 128, torch.bfloat16, 7, label=f"{backend} {opts}",
           **opts)


@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_layouts(name, prefix, branches):
    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    _check(_triton(layout), layout, 8, 2, 128, torch.bfloat16, 1, label=name)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 1), (6, 2), (12, 4), (28, 4), (16, 1), (32, 1), (48, 1), (71, 1)],
                         ids=["mha", "g8", "g3", "g3x4", "g7", "g16", "g32", "g48", "g71"])
def test_default_config_per_group_size(hq, hkv):
    """default_config sizes the packed tiles from the GQA group (64 forward rows, 64 dq rows): every group size. Past
    MAX_PACKED_GROUP the KV heads are repeated (32 and 48 down to 16, a prime 71 down to 1), the path whose packed
    programs would otherwise outgrow an SM's shared memory."""
    layout = random_layout(random.Random(hq * 31 + hkv), tokens=1800, device=DEV)
    _check(_triton(layout), layout, hq, hkv, 128, torch.bfloat16, hq + hkv, label=f"{hq}/{hkv} heads")


# Tile / pipeline variants of scripts/bench_attention.py --sweep (and the loads it does not time) at GPU tile sizes, on
# top of the (128, bf16) default config. *_block_m count query tokens (the MMA has block_m x group rows, rounded up to
# a power of two).
GPU_VARIANTS = {
    "fwd_pack32_w8": dict(fwd_block_m=32, fwd_warps=8),
    "fwd_pack32_n128_w8_s2": dict(fwd_block_m=32, fwd_block_n=128, fwd_warps=8, fwd_stages=2),
    "fwd_n32": dict(fwd_block_n=32),
    "fwd_nontma": dict(fwd_tma=False),
    "bwd_kv32_s3": dict(kv_block_m=32, kv_stages=3, bwd_gluon=False),
    "bwd_nontma": dict(bwd_tma=False, bwd_gluon=False),
    "bwd_kv128_w8_dq32_w8": dict(kv_block_n=128, kv_warps=8, dq_block_m=32, dq_warps=8, bwd_gluon=False),
    "bwd_kv_s3": dict(kv_stages=3, bwd_gluon=False),
    "bwd_plain": dict(bwd_gluon=False),
}


@pytest.mark.parametrize("hq,hkv", [(8, 2), (6, 2)], ids=["g4", "g3"])
@pytest.mark.parametrize("name,prefix,branches", [AWKWARD[2], AWKWARD[3]], ids=[AWKWARD[2][0], AWKWARD[3][0]])
@pytest.mark.parametrize("variant", list(GPU_VARIANTS), ids=list(GPU_VARIANTS))
def test_speed_variants(variant, name, prefix, branches, hq, hkv):
    from dataclasses import replace

    from prefix_attn.triton import default_config

    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    cfg = replace(default_config(128, torch.bfloat16, torch.device(DEV), hq // hkv), **GPU_VARIANTS[variant])
    _check(_triton(layout, config=cfg), layout, hq, hkv, 128, torch.bfloat16, 2, label=f"{variant} {name}")


@pytest.mark.parametrize("variant",
                         ["fwd_pack32_w8", "bwd_kv32_s3", "bwd_kv128_w8_dq32_w8", "bwd_nontma", "fwd_nontma"])
def test_speed_variants_with_options(variant):
    from dataclasses import replace

    from prefix_attn.triton import default_config

    layout = PrefixLayout.from_lengths([700, 63], [[1, 64, 129, 300, 2, 127], [65, 1]], device=DEV)
    cfg = replace(default_config(128, torch.bfloat16, torch.device(DEV), 4), **GPU_VARIANTS[variant])
    opts = dict(window=100, softcap=20.0)
    _check(_triton(layout, config=cfg, **opts), layout, 8, 2, 128, torch.bfloat16, 4, label=variant, **opts)


@pytest.mark.parametrize("seed", range(2))
def test_random_d64(seed):
    layout = random_layout(random.Random(seed), tokens=1500, device=DEV)
    _check(_triton(layout), layout, 8, 2, 64, torch.bfloat16, seed, label=f"d64 seed {seed}")


def test_large_row():
    layout = PrefixLayout.from_lengths([2047] * 3, [[257, 257]] * 3, device=DEV)  # ~7.7K tokens
    _check(_triton(layout), layout, 4, 1, 128, torch.bfloat16, 3, label="large")


@pytest.mark.parametrize("seed", range(1))
def test_flex_agrees_with_float64(seed):
    layout = random_layout(random.Random(100 + seed), tokens=1200, device=DEV)

    def flex(q, k, v):
        return prefix_attention(q, k, v, layout, backend="flex")

    _check(flex, layout, 8, 2, 128, torch.bfloat16, seed, label="flex")


def test_auto_picks_triton_on_hopper():
    from prefix_attn import resolve_backend

    if torch.cuda.get_device_capability()[0] >= 9:
        assert resolve_backend("auto", torch.device(DEV), torch.bfloat16, 128) == "triton"


@pytest.mark.parametrize("compile_first", [False, True], ids=["eager_first", "compile_first"])
def test_torch_compile_traces_the_op(compile_first):
    """Also on a fresh layout whose tables the compiled call is the first to need (built outside the graph)."""
    torch._dynamo.reset()
    layout = PrefixLayout.from_lengths([100, 5], [[30, 40], [7]], device=DEV)
    q, k, v = (torch.randn(layout.total_tokens, h, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for h in (4, 2, 2))
    f = _triton(layout)
    if compile_first:
        out = torch.compile(f)(q, k, v)
        ref = f(q, k, v)
    else:
        ref = f(q, k, v)
        out = torch.compile(f)(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_torch_compile_traces_the_op_with_options():
    """The custom ops with a window, a soft-cap and sinks (the lse and its gradient through the op): the compiled
    output and gradients against the eager ones. The kernels are the same; the sink epilogue may be fused
    differently, so up to bf16 rounding of the output."""
    layout = PrefixLayout.from_lengths([100, 5], [[30, 40], [7]], device=DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(layout.total_tokens, h, 64, device=DEV, generator=g, dtype=torch.bfloat16) for h in (4, 2, 2)]
    xs.append(torch.randn(4, device=DEV, generator=g, dtype=torch.bfloat16))
    f = _with_options(layout, "triton", window=20, softcap=5.0, sinks=True)
    results = []
    for fn in (f, torch.compile(f)):
        ins = [x.detach().requires_grad_() for x in xs]
        o = fn(*ins)
        results.append([o.detach(), *torch.autograd.grad(o, ins, torch.ones_like(o))])
    for name, a, b in zip(("out", "dq", "dk", "dv", "dsinks"), *results):
        torch.testing.assert_close(a.float(), b.float(), rtol=2**-7, atol=2**-7 * b.float().abs().max().item(),
                                   msg=name)


def test_row_of_135k_tokens():
    """A 135K-token row (33 documents of 4,096 tokens; rows up to 128K must work). Documents are independent,
    so the first, a middle and the last document's outputs and q/k/v gradients, taken from the whole row's forward
    and backward, are checked against float64 on that document alone (the last sits past token 2^17: any 32-bit
    index overflow or tile arithmetic that drifts with T shows there)."""
    n_docs, prefix, branches = 33, 2047, [1025, 1024]
    layout = PrefixLayout.from_lengths([prefix] * n_docs, [branches] * n_docs, device=DEV)
    T, doc = layout.total_tokens, prefix + sum(branches)
    assert T == n_docs * doc and T > 2**17
    hq, hkv, d, dtype = 8, 2, 128, torch.bfloat16
    g = torch.Generator(device=DEV).manual_seed(5)
    q, k, v, do = (torch.randn(T, h, d, device=DEV, generator=g).to(dtype) for h in (hq, hkv, hkv, hq))
    xs = [x.detach().requires_grad_() for x in (q, k, v)]
    o = _triton(layout)(*xs)
    grads = torch.autograd.grad(o, xs, do)
    one = PrefixLayout.from_lengths([prefix], [branches], device=DEV)
    floor = 4 * torch.finfo(torch.float32).eps
    for i in (0, n_docs // 2, n_docs - 1):
        sl = slice(i * doc, (i + 1) * doc)

        def run(cast):
            ys = [x[sl].detach().to(cast).requires_grad_() for x in (q, k, v)]
            out = attention_math(*ys, one)
            return [out.detach(), *torch.autograd.grad(out, ys, do[sl].to(cast))]

        truth, same = run(torch.float64), run(dtype)
        got = [o[sl].detach(), *(gr[sl] for gr in grads)]
        scale = do[sl].double().norm().item()
        for name, x, t, s in zip(("out", "dq", "dk", "dv"), got, truth, same):
            assert torch.isfinite(x).all(), f"doc {i} {name}: non-finite"
            err, ref = _err(x, t, scale), _err(s, t, scale)
            assert err <= 2 * ref + floor, f"doc {i} {name}: error {err:.3e} > 2 x torch {dtype} error {ref:.3e}"


# The backward's KV-major and dq kernels both ways, Gluon (the default on Hopper: prefix_attn/triton/backward_gluon.py)
# and plain Triton, at GQA groups 1, 2, 4, 5, 6, 7 and 8 (the dq kernel's 64 packed rows: 5, 6 and 7 fill 60, 60 and 63
# of them), the Gluon kernels checked to have run rather than fallen back to the plain ones (skipped where they cannot
# run).
GLUON_HEADS = [(8, 2), (28, 4), (4, 4), (6, 3), (16, 2), (32, 8), (6, 1), (14, 7), (40, 8)]
BACKWARD_KERNELS = {"gluon": dict(bwd_gluon=True), "plain": dict(bwd_gluon=False)}


def _backward_kernels(layout, hq, hkv, d, dtype, kernels="gluon", **kw):
    from dataclasses import replace

    from prefix_attn.triton import backward_gluon, default_config

    cfg = replace(default_config(d, dtype, torch.device(DEV), hq // hkv), **BACKWARD_KERNELS[kernels])
    if cfg.bwd_gluon:
        if not backward_gluon.available() or torch.cuda.get_device_capability()[0] != 9:
            pytest.skip("the Gluon kernels run on Hopper with a Triton that has Gluon")
        q = torch.empty(1, hq, d, device=DEV, dtype=dtype)
        k = torch.empty(1, hkv, d, device=DEV, dtype=dtype)
        assert backward_gluon.supported(q, k, cfg.kv_block_m, cfg.kv_block_n, None, None), "Gluon KV kernel not run"
        assert backward_gluon.supported_dq(q, k, cfg.dq_block_m, cfg.dq_block_n, None, None), "Gluon dq kernel not run"
    return _triton(layout, config=cfg, **kw)


@pytest.mark.parametrize("kernels", list(BACKWARD_KERNELS))
@pytest.mark.parametrize("seed", range(len(GLUON_HEADS)))
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (128, torch.float16)],
                         ids=["d128-bf16", "d64-bf16", "d128-fp16"])
def test_backward_kernels_random_layouts(seed, d, dtype, kernels):
    layout = random_layout(random.Random(seed), tokens=random.Random(seed).choice([700, 1500, 2600]), device=DEV)
    hq, hkv = GLUON_HEADS[seed]
    _check(_backward_kernels(layout, hq, hkv, d, dtype, kernels), layout, hq, hkv, d, dtype, seed,
           label=f"{kernels} {hq}/{hkv} heads")


@pytest.mark.parametrize("kernels", list(BACKWARD_KERNELS))
@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (28, 4)], ids=["g4", "g7"])
def test_backward_kernels_awkward_layouts(name, prefix, branches, hq, hkv, kernels):
    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    _check(_backward_kernels(layout, hq, hkv, 128, torch.bfloat16, kernels), layout, hq, hkv, 128, torch.bfloat16, 5,
           label=f"{kernels} {name}")


@pytest.mark.parametrize("hq,hkv", [(32, 8), (28, 4)], ids=["g4", "g7"])
def test_gluon_backward_agrees_bitwise_with_the_plain_kernels(hq, hkv):
    """Same operations in the same order, no atomics: dq, dk and dv equal the plain kernels' bit for bit."""
    layout = random_layout(random.Random(11), tokens=2600, device=DEV)
    g = torch.Generator(device=DEV).manual_seed(11)
    q, k, v, do = (torch.randn(layout.total_tokens, h, 128, device=DEV, generator=g).to(torch.bfloat16)
                   for h in (hq, hkv, hkv, hq))
    outs = []
    for kernels in BACKWARD_KERNELS:
        xs = [x.detach().requires_grad_() for x in (q, k, v)]
        o = _backward_kernels(layout, hq, hkv, 128, torch.bfloat16, kernels)(*xs)
        outs.append(torch.autograd.grad(o, xs, do))
    for name, a, b in zip(("dq", "dk", "dv"), *outs):
        assert torch.equal(a, b), f"{name} differs"
