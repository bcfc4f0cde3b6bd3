"""CPU tests of the `triton` attention backend through Triton's interpreter (TRITON_INTERPRET=1).

Outputs and dq, dk, dv (and d sinks) are compared with a float64 computation of the mask (``attention_math`` on
float64 inputs), also with a sliding window, logit soft-capping and attention sinks.
Tolerances are derived, not tuned: the kernel's relative error against float64 must be at most twice the
error of the same computation done by torch in the kernel's dtype (``attention_math`` in fp32 / fp16), plus a floor
of four fp32 epsilons (relative to max(|truth|, |dO|)). fp32 and fp16 only: bf16 ``tl.dot`` is broken in the CPU interpreter.
The kernels are the GPU's (GQA-packed forward and dq, one loop per tile, document-ordered launch, TMA loads), with
small tiles (the CPU default config: 16-token query tiles, 16-key tiles) so that short rows cross many tiles.
"""

from __future__ import annotations

import os
import random
from dataclasses import replace

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from prefix_attn import PrefixLayout, prefix_attention  # noqa: E402
from prefix_attn.reference import attention_math  # noqa: E402
from prefix_attn.schedule import backward_schedule, forward_schedule, token_tables  # noqa: E402
from prefix_attn import triton as ta  # noqa: E402
from prefix_attn.triton import forward  # noqa: E402

if type(forward.fwd_kernel).__name__ != "InterpretedFunction":  # pragma: no cover
    pytest.skip("prefix_attn.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

def _rel(a: torch.Tensor, ref: torch.Tensor, scale: float) -> float:
    return ((a.double() - ref).norm() / max(ref.norm().item(), scale)).item()


def _check_against_float64(layout, hq, hkv, d, dtype, seed=0, scale=None, config=None, window=None, softcap=None,
                           sinks=False):
    """Run the kernel, float64 truth and the same-dtype torch reference; assert the derived tolerance. ``sinks``:
    random sink logits (and their gradient) through ``prefix_attention``'s epilogue."""
    g = torch.Generator().manual_seed(seed)
    T = layout.total_tokens
    q = torch.randn(T, hq, d, generator=g).to(dtype)
    k = torch.randn(T, hkv, d, generator=g).to(dtype)
    v = torch.randn(T, hkv, d, generator=g).to(dtype)
    do = torch.randn(T, hq, d, generator=g).to(dtype)
    xs = (q, k, v) + ((torch.randn(hq, generator=g) * 2 + 1).to(dtype),) if sinks else (q, k, v)
    opts = dict(window=window, softcap=softcap)

    def run(fn, xs, cast):
        xs = [x.detach().to(cast).requires_grad_() for x in xs]
        o = fn(*xs[:3], sinks=xs[3] if sinks else None)
        o.backward(do.to(cast))
        return [o.detach()] + [x.grad for x in xs]

    if sinks or config is None:
        got = run(lambda a, b, c, sinks: prefix_attention(a, b, c, layout, scale, "triton", sinks=sinks, **opts), xs,
                  dtype)
    else:
        got = run(lambda a, b, c, sinks: ta.triton_prefix_attention(a, b, c, layout, scale, config=config, **opts),
                  xs, dtype)
    truth = run(lambda a, b, c, sinks: attention_math(a, b, c, layout, scale, sinks=sinks, **opts), xs, torch.float64)
    same = run(lambda a, b, c, sinks: attention_math(a, b, c, layout, scale, sinks=sinks, **opts), xs, dtype)
    # Floor: four fp32 epsilons (the kernel accumulates in fp32; delta and dP are summed in different orders),
    # relative to max(|truth|, |dO|): it only matters where the truth is (near) zero, e.g. dq and dk of a query
    # that sees only itself.
    floor = 4 * torch.finfo(torch.float32).eps
    scale = do.double().norm().item()
    for name, x, t, s in zip(("out", "dq", "dk", "dv", "dsinks"), got, truth, same):
        assert x.dtype == dtype and x.shape == t.shape, name
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        err, ref_err = _rel(x, t, scale), _rel(s, t, scale)
        assert err <= 2 * ref_err + floor, f"{name}: kernel error {err:.3e} > 2 x torch {dtype} error {ref_err:.3e}"
    return got


def _random_layout(rng: random.Random, max_docs=6, max_prefix=40, max_branches=4, max_branch=30):
    n = rng.randint(1, max_docs)
    prefix = [rng.choice([0, 1, rng.randint(0, max_prefix)]) for _ in range(n)]
    branches = [[rng.choice([1, rng.randint(1, max_branch)]) for _ in range(rng.randint(1, max_branches))]
                for _ in range(n)]
    return PrefixLayout.from_lengths(prefix, branches)


# (name, prefix_lens, branch_lens): lengths 1, tile sizes +-1 (tiles of 16 and 32), documents shorter than a tile,
# many documents in one tile, empty prefixes, 8 branches.
AWKWARD = [
    ("one_token", [0], [[1]]),
    ("ones", [1, 0, 1], [[1], [1, 1], [1]]),
    ("tile_pm1", [15, 16, 17], [[31, 32], [33], [16, 1]]),
    ("prefix_is_tile", [32], [[16, 16, 17]]),
    ("empty_prefixes", [0, 0, 0], [[5, 9], [17], [1, 2, 3]]),
    ("many_tiny_docs", [0, 1, 2, 1, 0, 2, 1, 0, 1, 2, 0, 1], [[1], [2, 1], [1, 3], [1], [2, 2], [1], [3], [1, 1, 1],
                                                               [2], [1, 2], [3], [1, 1]]),
    ("eight_branches", [10], [[1, 20, 3, 17, 16, 15, 2, 9]]),
    ("long_prefix", [70], [[9, 40]]),
]


@pytest.mark.parametrize("dtype,hq,hkv", [(torch.float32, 4, 2), (torch.float16, 4, 2), (torch.float16, 4, 1)],
                         ids=["fp32_g2", "fp16_g2", "fp16_g4"])
@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_layouts(name, prefix, branches, dtype, hq, hkv):
    layout = PrefixLayout.from_lengths(prefix, branches)
    _check_against_float64(layout, hq=hq, hkv=hkv, d=16, dtype=dtype, seed=len(name))


# GQA groups 1, 3 (16 tokens x 3 heads: 48 rows padded to 64), 4 and 8, one head and several KV heads.
@pytest.mark.parametrize("hq,hkv", [(3, 1), (3, 3), (6, 2), (1, 1), (8, 1), (8, 2)])
def test_heads_and_gqa(hq, hkv):
    layout = PrefixLayout.from_lengths([20, 3], [[13, 30], [1, 5, 8]])
    _check_against_float64(layout, hq=hq, hkv=hkv, d=16, dtype=torch.float32, seed=hq * 10 + hkv)


@pytest.mark.parametrize("seed", range(4))
def test_random_layouts(seed):
    rng = random.Random(seed)
    layout = _random_layout(rng)
    dtype = (torch.float32, torch.float16)[seed % 2]
    _check_against_float64(layout, hq=2, hkv=1, d=16, dtype=dtype, seed=seed)


# Windows that bite (1: each token sees itself; shorter than a tile; longer than some documents, shorter than
# others), soft-caps that bite (the scores of these unit-variance inputs reach about 5) and sinks, alone and together,
# in fp32 and fp16, on layouts whose branches start past the window (prefixes of 40-70 tokens).
OPTIONS = [
    dict(window=1), dict(window=5), dict(window=23), dict(softcap=1.5), dict(softcap=20.0), dict(sinks=True),
    dict(window=9, softcap=3.0), dict(window=12, sinks=True), dict(window=7, softcap=2.0, sinks=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}{v}" for k, v in o.items()))
@pytest.mark.parametrize("name,prefix,branches", [AWKWARD[2], AWKWARD[6], AWKWARD[7]],
                         ids=[AWKWARD[i][0] for i in (2, 6, 7)])
def test_options(name, prefix, branches, opts, dtype):
    layout = PrefixLayout.from_lengths(prefix, branches)
    _check_against_float64(layout, hq=4, hkv=2, d=16, dtype=dtype, seed=len(name), **opts)


@pytest.mark.parametrize("seed", range(6))
def test_options_on_random_layouts(seed):
    rng = random.Random(50 + seed)
    layout = _random_layout(rng, max_prefix=60)
    opts = dict(window=rng.choice([None, 2, 8, 20, 45]), softcap=rng.choice([None, 2.0, 8.0]),
                sinks=rng.random() < 0.5)
    _check_against_float64(layout, hq=4, hkv=(1, 2, 4)[seed % 3], d=16, dtype=(torch.float32, torch.float16)[seed % 2],
                           seed=seed, **opts)


@pytest.mark.parametrize("d", [32, 64])
def test_head_dims(d):
    layout = PrefixLayout.from_lengths([17, 0], [[16, 9], [33]])
    _check_against_float64(layout, hq=2, hkv=1, d=d, dtype=torch.float16, seed=d, scale=0.3)


_CPU = ta.default_config(16, torch.float32, torch.device("cpu"))
CONFIGS = {
    # plain loads instead of TMA descriptors (GPUs before Hopper, rows not 16-byte aligned)
    "no_tma": replace(_CPU, fwd_tma=False, bwd_tma=False),
    # query tiles narrower than key tiles (forward, dq), KV tiles narrower than query tiles (backward)
    "bm_lt_bn": replace(_CPU, fwd_block_m=8, fwd_block_n=32, kv_block_m=32, kv_block_n=16, dq_block_m=8,
                        dq_block_n=32),
    # the dq kernel with tiles of its own, larger than the forward's
    "dq_tiles": replace(_CPU, dq_block_m=32, dq_block_n=32),
    # query tiles of token counts that are not powers of two (a GPU packs 9 tokens of a GQA group of 7 into 64 rows):
    # the rows past tokens x group pad the MMA, and the tiles straddle key tiles everywhere
    "odd_query_tiles": replace(_CPU, fwd_block_m=9, dq_block_m=11),
}


@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 1), (2, 2)], ids=["g2", "g3_padded", "g1"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_configs(name, hq, hkv):
    layout = PrefixLayout.from_lengths([31, 0, 5], [[1, 17, 33], [15], [2, 2, 2, 2]])
    _check_against_float64(layout, hq=hq, hkv=hkv, d=16, dtype=torch.float32, seed=hq + 7, config=CONFIGS[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_options_with_configs(name):
    layout = PrefixLayout.from_lengths([31, 0, 5, 44], [[1, 17, 33], [15], [2, 2, 2, 2], [3, 20, 1]])
    _check_against_float64(layout, hq=4, hkv=2, d=16, dtype=torch.float32, seed=11, config=CONFIGS[name], window=10,
                           softcap=3.0)


@pytest.mark.parametrize("tma", [False, True], ids=["plain", "tma"])
def test_empty_and_partial_walks(tma):
    """The forward on hand-made schedules, every tile masked: an empty walk (no key tile: out = 0, no NaN), a walk of
    one tile, walks ending at the row's last (partial) key tile; but for the empty one, the attention itself."""
    T, hq, hkv, d, bm, bn = 45, 4, 2, 16, 8, 16
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv))
    layout = PrefixLayout.from_lengths([0], [[T]])  # one causal document: lo1 = hi1 = 0, lo2 = 0
    tok = token_tables(layout).ranges
    nqt = -(-T // bm)
    # per query tile: range 1 empty; range 2 = [s4, s9) masked only (so every tile takes the masked path)
    walks = [(0, 0), (0, 1)] + [(0, (t * bm + bm - 1) // bn + 1) for t in range(2, nqt)]
    sched = torch.zeros(nqt, 10, dtype=torch.int32)
    for t, (a, b) in enumerate(walks):
        sched[t, 4:] = torch.tensor([a, b, b, b, b, b], dtype=torch.int32)
    cfg = replace(_CPU, fwd_block_m=bm, fwd_block_n=bn, fwd_tma=tma)
    o, lse = forward.launch_forward(q, k, v, sched, tok, d**-0.5, cfg)
    assert torch.isfinite(o).all() and torch.isfinite(lse).all()
    assert (o[:bm] == 0).all()  # the empty walk's queries
    torch.testing.assert_close(o[bm:], attention_math(q, k, v, layout)[bm:], rtol=1e-5, atol=1e-5)


def test_config_list_roundtrip():
    for cfg in (_CPU, *CONFIGS.values(), ta.TritonAttentionConfig()):
        assert ta.TritonAttentionConfig.from_list(cfg.as_list()) == cfg


def test_query_sees_only_itself():
    # Every document is one branch of one token: each query sees only itself, so out == v exactly.
    layout = PrefixLayout.from_lengths([0] * 40, [[1]] * 40)
    q, k, v = (torch.randn(40, 2, 16) for _ in range(3))
    out = ta.triton_prefix_attention(q, k, v, layout)
    torch.testing.assert_close(out, v, rtol=0, atol=0)


def test_gradients_are_reproducible():
    layout = PrefixLayout.from_lengths([20], [[30, 15]])
    q, k, v = (torch.randn(layout.total_tokens, 2, 16, requires_grad=True) for _ in range(3))
    grads = []
    for _ in range(2):
        o = ta.triton_prefix_attention(q, k, v, layout)
        grads.append(torch.autograd.grad(o.sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_prefix_attention_dispatch():
    layout = PrefixLayout.from_lengths([9], [[4, 6]])
    q, k, v = (torch.randn(layout.total_tokens, 2, 16) for _ in range(3))
    out = prefix_attention(q, k, v, layout, backend="triton")
    ref = prefix_attention(q, k, v, layout, backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_supported():
    ok, why = ta.triton_supported(torch.device("cpu"), torch.float32, 64)
    assert ok, why  # TRITON_INTERPRET=1 here
    assert not ta.triton_supported(torch.device("cpu"), torch.float32, 96)[0]
    assert not ta.triton_supported(torch.device("cpu"), torch.int8, 64)[0]


@pytest.mark.parametrize("hq,hkv,block_m,dq", [(32, 8, 16, True), (28, 4, 9, True), (40, 8, 12, True),
                                                (28, 4, 8, True), (16, 1, 4, False), (32, 8, 32, False)],
                         ids=["g4", "g7", "g5", "g7_pow2_tiles", "g16_hand_made", "g4_128_rows"])
def test_gluon_dq_kernel_takes_64_packed_rows_of_groups_up_to_8(monkeypatch, hq, hkv, block_m, dq):
    # The Gluon dq kernel runs 64 packed rows (any token count that fills them) of the GQA groups its GPU tests cover;
    # the other tiles and groups go to the plain kernel. The input checks (a Hopper GPU, 16 bits) are taken as met.
    from prefix_attn.triton import backward_gluon

    monkeypatch.setattr(backward_gluon, "_inputs_ok", lambda *a: True)
    q, k = torch.empty(1, hq, 128), torch.empty(1, hkv, 128)
    assert backward_gluon.supported_dq(q, k, block_m, 64, None, None) == dq
    assert not backward_gluon.supported_dq(q, k, block_m, 32, None, None)


# ----------------------------------------------------------------------------------------------- schedules (pure torch)


def _visited(sched: torch.Tensor, n_cols: int, segments):
    """[rows, n_cols] masks of visited / full column tiles from a schedule and its (start, end, is_full) columns."""
    j = torch.arange(n_cols)[None, :]
    visited = torch.zeros(sched.shape[0], n_cols, dtype=torch.int64)
    full = torch.zeros(sched.shape[0], n_cols, dtype=torch.bool)
    for a, b, is_full in segments:
        inr = (j >= sched[:, a, None].long()) & (j < sched[:, b, None].long())
        visited += inr.long()
        if is_full:
            full |= inr
    return visited, full


FWD_SEGMENTS = [(0, 1, False), (1, 2, True), (2, 3, False), (4, 5, False), (5, 6, True), (6, 7, False), (7, 8, True),
                (8, 9, False)]
BWD_SEGMENTS = [(0, 1, False), (1, 2, True), (2, 3, False)]


@pytest.mark.parametrize("window", [None, 1, 6, 29], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("bm,bn", [(16, 16), (32, 16), (16, 32), (8, 64), (9, 64)])
def test_schedules_cover_mask_exactly(seed, bm, bn, window):
    """Each tile holding an allowed pair is visited exactly once; every tile marked full is fully allowed (under a
    window: of the windowed mask, which the position ids define)."""
    layout = _random_layout(random.Random(seed), max_docs=8, max_prefix=70, max_branches=8, max_branch=50)
    T = layout.total_tokens
    mask = layout.dense_mask()
    if window is not None:
        pos = layout.position_ids
        mask = mask & (pos[:, None] - pos[None, :] < window)
        assert torch.equal(mask, layout.dense_mask(window))
    nqt, nkt = -(-T // bm), -(-T // bn)
    pad = torch.zeros(nqt * bm, nkt * bn, dtype=torch.bool)
    pad[:T, :T] = mask
    tiles = pad.view(nqt, bm, nkt, bn)
    any_allowed = tiles.any(3).any(1)  # [nqt, nkt]
    # A tile is "full" when every real query sees every key (and no key is padding).
    kvalid = torch.zeros(nkt * bn, dtype=torch.bool)
    kvalid[:T] = True
    qvalid = torch.zeros(nqt * bm, dtype=torch.bool)
    qvalid[:T] = True
    all_allowed = (pad | ~qvalid[:, None]).view(nqt, bm, nkt, bn).all(3).all(1) & kvalid.view(nkt, bn).all(1)[None]

    sched = forward_schedule(layout, bm, bn, window)
    visited, full = _visited(sched, nkt, FWD_SEGMENTS)
    assert visited.max() <= 1, "a key tile is visited twice"
    assert (visited.bool() | ~any_allowed).all(), "an allowed pair is never visited"
    assert (~full | all_allowed).all(), "a tile run without mask has masked pairs"

    # Backward: per key tile (rows), the query tiles (columns); transpose the tile grid with key tiles of bn, query bm.
    ksched = backward_schedule(layout, bn, bm, window)
    kvisited, kfull = _visited(ksched, nqt, BWD_SEGMENTS)
    assert kvisited.max() <= 1
    assert (kvisited.bool() | ~any_allowed.t()).all()
    assert (~kfull | all_allowed.t()).all()


@pytest.mark.parametrize("hq,hkv,limit,kv_heads", [(8, 1, 2, 4), (6, 2, 2, 6), (12, 1, 16, 1)],
                         ids=["g8_split_by_4", "g3_split_by_3", "g12_not_split"])
def test_large_gqa_groups_run_with_kv_heads_repeated(monkeypatch, hq, hkv, limit, kv_heads):
    # A group of more than MAX_PACKED_GROUP query heads per KV head would outgrow an SM's shared memory in the packed
    # kernels: each KV head is repeated until the group fits. Here with a small limit, so that the interpreter runs
    # it; the repeats' gradients must sum back into dk and dv (float64 harness).
    from prefix_attn.triton import attention as tattn
    from prefix_attn.triton import config as tconfig

    monkeypatch.setattr(tconfig, "MAX_PACKED_GROUP", limit)
    groups = []
    real = tattn.default_config
    monkeypatch.setattr(tattn, "default_config",
                        lambda d, dtype, device, g=4: groups.append(g) or real(d, dtype, device, g))
    layout = PrefixLayout.from_lengths([20, 3], [[13, 30], [1, 5, 8]])
    _check_against_float64(layout, hq=hq, hkv=hkv, d=16, dtype=torch.float32, seed=hq + hkv)
    assert groups and set(groups) == {hq // kv_heads}
