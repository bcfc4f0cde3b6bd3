"""The `reference` and `flex` backends against a float64 computation of the layout's mask (docs/DESIGN.md).

Tolerances are derived (docs/DESIGN.md, the exactness contract): a backend's error against float64 may be at most 2x the error of the
same-precision explicit torch computation (`attention_math` in the inputs' dtype), plus a floor of a few ulps at the
magnitude of the unit-variance inputs, for the exact-zero cases (a query that sees one key has dq = 0 exactly).
"""

import random

import pytest
import torch

from prefix_attn import PrefixLayout, prefix_attention
from prefix_attn.reference import attention_math

LAYOUTS = [
    ([0], [[1]]),
    ([1], [[1, 1]]),
    ([7, 0, 2], [[1, 5], [3], [1, 1, 1, 1, 1, 1, 1, 1]]),
    ([127, 1], [[129, 1], [128, 2]]),  # tile size +- 1 (flex tiles are 128)
    ([3] * 30, [[2, 2]] * 30),  # many tiny documents in one tile
]


def random_qkv(T, hq, hkv, d, dtype, seed, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    make = lambda h: torch.randn(T, h, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)  # noqa: E731
    return make(hq), make(hkv), make(hkv)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def tolerance(same_precision_err, ref, dtype, terms=1, head_dim=16):
    """2x the same-precision error, plus a floor for exact zeros: a length-D dot product (the softmax Jacobian's
    rowsum(dO * O)) carries up to D ulps of rounding at the unit scale of the inputs, per summed term (dk, dv sum over
    the GQA group). A real fault is O(1); the floor (~1e-5 in fp32) does not hide it."""
    return 2 * same_precision_err + 4 * terms * head_dim * torch.finfo(dtype).eps * max(ref.abs().max().item(), 1.0)


@pytest.mark.parametrize("case", range(len(LAYOUTS)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3), (6, 1)])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_dense_backends_forward_and_grads(backend, case, dtype, heads):
    """The dense-mask reference and the per-sequence SDPA decomposition (empty prefixes, one-token branches, many
    branches, GQA)."""
    layout = PrefixLayout.from_lengths(*LAYOUTS[case])
    hq, hkv = heads
    q, k, v = random_qkv(layout.total_tokens, hq, hkv, 16, dtype, seed=case, requires_grad=True)
    scale = 0.3
    out = prefix_attention(q, k, v, layout, softmax_scale=scale, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_math(q64, k64, v64, layout, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())

    qs, ks, vs = (x.detach().clone().requires_grad_() for x in (q, k, v))
    same = attention_math(qs, ks, vs, layout, scale)
    same_grads = torch.autograd.grad(same, (qs, ks, vs), g)

    assert torch.isfinite(out).all()
    assert err(out, ref) <= tolerance(err(same, ref), ref, dtype)
    for name, a, r, s in zip("qkv", grads, ref_grads, same_grads):
        terms = 1 if name == "q" else hq // hkv
        assert err(a, r) <= tolerance(err(s, r), r, dtype, terms), f"d{name}"


@pytest.mark.parametrize("case", [0, 2, 3])
def test_flex_backend_forward_on_cpu(case):
    # FlexAttention runs its forward eagerly on the CPU (no backward there); gradients are tested on the GPU
    # (tests/gpu/test_triton_gpu.py).
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = PrefixLayout.from_lengths(*LAYOUTS[case])
    q, k, v = random_qkv(layout.total_tokens, 4, 2, 16, torch.float32, seed=10 + case)
    out = prefix_attention(q, k, v, layout, backend="flex")
    ref = attention_math(q.double(), k.double(), v.double(), layout)
    same = attention_math(q, k, v, layout)
    assert err(out, ref) <= tolerance(err(same, ref), ref, torch.float32)


OPTIONS = [dict(window=1), dict(window=4), dict(softcap=0.5), dict(sinks=True), dict(window=3, softcap=1.0, sinks=True)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("case", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_backend_with_options(case, dtype, opts):
    # A sliding window, soft-capping and sinks: forward and every gradient (the sinks' too) against float64.
    layout = PrefixLayout.from_lengths(*LAYOUTS[case])
    q, k, v = random_qkv(layout.total_tokens, 4, 2, 16, dtype, seed=case, requires_grad=True)
    inputs = [q, k, v]
    if opts.get("sinks"):
        inputs.append((torch.randn(4, generator=torch.Generator().manual_seed(1)) + 1).to(dtype).requires_grad_())
    kw = dict(window=opts.get("window"), softcap=opts.get("softcap"))

    def run(fn, xs):
        out = fn(*xs[:3], sinks=xs[3] if len(xs) == 4 else None)
        return out, torch.autograd.grad(out, xs, g.to(out.dtype))

    g = torch.randn(layout.total_tokens, 4, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    out, grads = run(lambda a, b, c, sinks: prefix_attention(a, b, c, layout, 0.3, "reference", sinks=sinks, **kw),
                     inputs)
    ref, ref_grads = run(lambda a, b, c, sinks: attention_math(a, b, c, layout, 0.3, sinks=sinks, **kw),
                         [x.detach().double().requires_grad_() for x in inputs])
    same, same_grads = run(lambda a, b, c, sinks: attention_math(a, b, c, layout, 0.3, sinks=sinks, **kw),
                           [x.detach().clone().requires_grad_() for x in inputs])
    assert err(out, ref) <= tolerance(err(same, ref), ref, dtype)
    for name, a, r, s in zip(["q", "k", "v", "sinks"], grads, ref_grads, same_grads):
        terms = {"q": 1, "k": 2, "v": 2, "sinks": layout.total_tokens}[name]
        assert err(a, r) <= tolerance(err(s, r), r, dtype, terms), f"d{name}"


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
def test_flex_backend_forward_with_options(opts):
    pytest.importorskip("torch.nn.attention.flex_attention")
    layout = PrefixLayout.from_lengths(*LAYOUTS[3])
    q, k, v = random_qkv(layout.total_tokens, 4, 2, 16, torch.float32, seed=4)
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(1)) + 1 if opts.get("sinks") else None
    kw = dict(window=opts.get("window"), softcap=opts.get("softcap"), sinks=sinks)
    out = prefix_attention(q, k, v, layout, backend="flex", **kw)
    kw64 = {**kw, "sinks": None if sinks is None else sinks.double()}
    ref = attention_math(q.double(), k.double(), v.double(), layout, **kw64)
    same = attention_math(q, k, v, layout, **kw)
    assert err(out, ref) <= tolerance(err(same, ref), ref, torch.float32)


def test_compiled_flex_takes_several_soft_caps():
    # The GPU's path (FlexAttention under torch.compile), here on the CPU's inductor: a second cap value recompiles
    # the graph, which must not turn the cap into a dynamic float (its score_mod lowering fails on one).
    from prefix_attn import flex

    layout = PrefixLayout.from_lengths([100, 3], [[20, 30], [5]])
    q, k, v = random_qkv(layout.total_tokens, 4, 2, 16, torch.float32, seed=5)
    for cap in (50.0, 2.0):
        out = flex._compiled_flex()(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                    block_mask=flex.build_block_mask(layout), enable_gqa=True,
                                    score_mod=flex._softcap_mod(cap, q.device))[0].transpose(0, 1)
        ref = attention_math(q.double(), k.double(), v.double(), layout, softcap=cap)
        assert err(out, ref) <= tolerance(err(attention_math(q, k, v, layout, softcap=cap), ref), ref, torch.float32)


def test_a_backend_without_an_option_hands_the_call_to_triton(monkeypatch, caplog):
    # A registry entry that declares no options (as the FP8 forward declares no soft-cap) runs a call that needs one
    # on triton where that runs (the interpreter here), with a warning.
    from prefix_attn import ops

    calls = []
    monkeypatch.setitem(ops._BACKENDS, "reference", ops._Backend(lambda *a, **kw: calls.append(kw) or a[0]))
    monkeypatch.setattr(ops, "_warned", set())
    layout = PrefixLayout.from_lengths([2], [[3, 1]])
    q, k, v = random_qkv(layout.total_tokens, 2, 2, 8, torch.float32, seed=0)
    prefix_attention(q, k, v, layout, backend="reference")
    assert calls == [{}]
    assert ops.resolve_backend("reference", q.device, torch.float32, 8, frozenset({"softcap"})) == "reference"
    assert ops.resolve_backend("reference", q.device, torch.float32, 16, frozenset({"softcap"})) == "triton"
    with caplog.at_level("WARNING"):
        ops.resolve_backend("triton_fp8", q.device, torch.float16, 64, frozenset({"softcap"}))
    assert "has no logit soft-capping" in caplog.text


def test_options_are_checked():
    layout = PrefixLayout.from_lengths([2], [[3, 1]])
    q, k, v = random_qkv(layout.total_tokens, 2, 2, 8, torch.float32, seed=0)
    for bad in (dict(window=0), dict(window=2.5), dict(softcap=-1.0), dict(sinks=torch.zeros(3)), dict(sinks=[0.0])):
        with pytest.raises(ValueError):
            prefix_attention(q, k, v, layout, **bad)
    # A window as long as the longest document cuts nothing: the call reads the unwindowed tables.
    assert layout.biting_window(layout.max_doc_span) is None and layout.biting_window(layout.max_doc_span - 1) == 4
    torch.testing.assert_close(prefix_attention(q, k, v, layout, window=5), prefix_attention(q, k, v, layout))


def test_attention_is_confined_to_allowed_keys():
    # Perturbing keys/values a query may not see leaves its output unchanged, bit for bit.
    layout = PrefixLayout.from_lengths([4, 2], [[3, 5], [1, 2]])
    q, k, v = random_qkv(layout.total_tokens, 2, 2, 8, torch.float32, seed=3)
    out = prefix_attention(q, k, v, layout)
    mask = layout.dense_mask()
    for qi in range(layout.total_tokens):
        hidden = ~mask[qi]
        k2, v2 = k.clone(), v.clone()
        k2[hidden] += 5.0
        v2[hidden] -= 3.0
        assert torch.equal(prefix_attention(q, k2, v2, layout)[qi], out[qi])


def test_bad_inputs_raise_value_errors():
    layout = PrefixLayout.from_lengths([2], [[1, 2]])
    q, k, v = random_qkv(5, 4, 2, 8, torch.float32, seed=0)
    with pytest.raises(ValueError, match="total_tokens=5"):
        prefix_attention(q[:4], k[:4], v[:4], layout)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        prefix_attention(q[:, :3], k, v, layout)
    with pytest.raises(ValueError, match="3-D tensor"):
        prefix_attention(q[None], k, v, layout)
    with pytest.raises(ValueError, match="same shape"):
        prefix_attention(q, k, v[:, :1], layout)
    with pytest.raises(ValueError, match="same head_dim"):
        prefix_attention(q, k[..., :4], v[..., :4], layout)
    with pytest.raises(ValueError, match="unknown attention backend"):
        prefix_attention(q, k, v, layout, backend="magic")
    with pytest.raises(ValueError, match="PrefixLayout"):
        prefix_attention(q, k, v, {"prefix_lens": [2]})


def test_auto_backend_is_reference_on_cpu():
    from prefix_attn import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "reference"


def test_auto_runs_rows_of_long_prefixes_on_sdpa(monkeypatch):
    """Where ``auto`` means triton, a row whose every document has a prefix of at least DENSE_PREFIX_MIN tokens runs
    on the SDPA decomposition when the call needs no option; a row with one short prefix, or a call with an option,
    stays on triton. A row whose longest document is short is decided from host integers alone (no lengths read)."""
    from prefix_attn import ops, sdpa

    calls = []
    for name in ("triton", "sdpa"):
        monkeypatch.setitem(ops._BACKENDS, name, ops._Backend(
            lambda q, k, v, layout, scale, name=name, **kw: calls.append(name) or q, features=ops.ALL_FEATURES))
    monkeypatch.setattr(ops, "resolve_backend", lambda backend, *a, **kw: "triton" if backend == "auto" else backend)
    monkeypatch.setattr(sdpa, "DENSE_PREFIX_MIN", 8)

    def run(prefix, branches, **options):
        layout = PrefixLayout.from_lengths(prefix, branches)
        q, k, v = random_qkv(layout.total_tokens, 2, 1, 16, torch.float32, seed=0)
        prefix_attention(q, k, v, layout, backend="auto", **options)
        return calls.pop(), layout

    assert run([8, 12], [[1, 2], [3]])[0] == "sdpa"
    assert run([8, 7], [[1, 2], [3]])[0] == "triton"
    assert run([8, 12], [[1, 2], [3]], softcap=5.0)[0] == "triton"
    name, layout = run([3, 4], [[1, 2], [3]])
    assert name == "triton" and layout.cached("host_documents") is None
