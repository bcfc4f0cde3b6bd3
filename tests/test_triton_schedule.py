"""The fused table builder (``prefix_attn.triton.tables``) against the torch path, through Triton's interpreter.

Every tensor of ``build_tables`` (position ids included) must be bit-identical to the torch reference (same integers,
shapes, dtypes), on awkward and random layouts, with the CPU interpreter's tiles and the GPU's (64/128). Rows
stay at a few hundred tokens: the interpreter runs every op in numpy.
"""

from __future__ import annotations

import dataclasses
import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from prefix_attn import PrefixLayout, position_ids, prefix_attention  # noqa: E402
from prefix_attn import schedule as sch  # noqa: E402
from prefix_attn import triton as ta  # noqa: E402
from prefix_attn.triton import tables as tsch  # noqa: E402
from prefix_attn.triton.config import CONFIGS  # noqa: E402

if type(tsch.token_tile_kernel).__name__ != "InterpretedFunction":  # pragma: no cover
    pytest.skip("prefix_attn.triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

CPU_CFG = ta.default_config(16, torch.float32, torch.device("cpu"))  # fwd 16x16, kv 32 keys x 16, dq 16x16
GPU_CFG = CONFIGS["cuda_16bit"]  # fwd 16x64, kv 64 keys x 64, dq 16x64
GPU_G1_CFG = dataclasses.replace(GPU_CFG, fwd_block_m=64, dq_block_m=64)  # a GQA group of 1
GPU_BEFORE_CFG = dataclasses.replace(GPU_CFG, kv_block_n=128, dq_block_m=32)  # the earlier 128-key KV tiles
FP32_GPU_CFG = CONFIGS["cuda_fp32"]
# query tiles narrower than key tiles (forward), key tiles narrower than query tiles (backward), dq tiles of its own
SKEWED_CFG = dataclasses.replace(CPU_CFG, fwd_block_m=16, fwd_block_n=32, kv_block_m=32, kv_block_n=16,
                                 dq_block_m=16, dq_block_n=64)
# query tiles that are not a power of two (GQA groups of 7 and 3 on a GPU fill 64 rows with 9 and 21 tokens; an odd
# pair on the interpreter's tiles): a third launch makes their schedules
GPU_G7_CFG = dataclasses.replace(GPU_CFG, fwd_block_m=9, dq_block_m=9)
GPU_G3_CFG = dataclasses.replace(GPU_CFG, fwd_block_m=21, dq_block_m=21)
ODD_CFG = dataclasses.replace(CPU_CFG, fwd_block_m=5, dq_block_m=12)
CONFIGS = [CPU_CFG, GPU_CFG, GPU_G1_CFG, GPU_BEFORE_CFG, FP32_GPU_CFG, SKEWED_CFG, GPU_G7_CFG, GPU_G3_CFG, ODD_CFG]


NAMES = ("ranges", "q_hi", "position_ids", "fwd", "kv", "dq", "window_ranges", "kv_qmin")


@pytest.fixture(autouse=True)
def _fused_on(monkeypatch):
    monkeypatch.setenv(sch.ENV_FLAG, "1")


def _reference(prefix, branches, cfg, monkeypatch, window=None):
    """The torch path's tables (the fused path switched off for this layout only)."""
    monkeypatch.setenv(sch.ENV_FLAG, "0")
    layout = PrefixLayout.from_lengths(prefix, branches)
    out = sch.build_tables(layout, cfg.tile_shape, window)
    monkeypatch.setenv(sch.ENV_FLAG, "1")
    return out


def _assert_same(got: sch.AttentionTables, ref: sch.AttentionTables, what: str):
    assert got.tile == ref.tile and got.window == ref.window
    assert len(got.tensors()) == (6 if got.window is None else 8)
    for k, a, b in zip(NAMES[:len(got.tensors())], got.tensors(), ref.tensors(), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what} {k}: {a.dtype} {a.shape} != {b.dtype} {b.shape}"
        assert a.is_contiguous(), f"{what} {k}: not contiguous"
        if not torch.equal(a, b):
            bad = (a != b).nonzero()[:5].tolist()
            raise AssertionError(f"{what} {k}: differs at {bad}\nfused {a.tolist()}\ntorch {b.tolist()}")


def _fused_only(layout, *tiles):
    """Nothing but the fused builder's tables was derived: the torch path's per-token and per-tile tables never were."""
    assert layout.cached_keys() == {tsch.Segments, sch.TokenTables, *tiles}, layout.cached_keys()


def _check(prefix, branches, cfg, monkeypatch, position_ids_first=False, window=None):
    ref = _reference(prefix, branches, cfg, monkeypatch, window)
    layout = PrefixLayout.from_lengths(prefix, branches)
    if position_ids_first:  # the model forward asks for positions before any attention call
        pos = position_ids(layout)
        _fused_only(layout)
        got = sch.build_tables(layout, cfg.tile_shape, window)
        assert got.tokens.position_ids is pos
    else:
        got = sch.build_tables(layout, cfg.tile_shape, window)
        assert position_ids(layout) is got.tokens.position_ids
    _fused_only(layout, sch.table_key(cfg.tile_shape, window))
    _assert_same(got, ref, f"prefix={prefix} branches={branches} cfg={cfg} window={window}")
    return layout


# (name, prefix_lens, branch_lens): lengths 1, tile sizes +-1 (16, 32, 64, 128), documents shorter than a tile, many
# documents in one tile, empty prefixes, 8 branches, a single document, T not a multiple of any tile, segment
# boundaries on the fused kernel's chunk boundary.
AWKWARD = [
    ("one_token", [0], [[1]]),
    ("one_token_prefix", [1], [[1]]),
    ("ones", [1, 0, 1], [[1], [1, 1], [1]]),
    ("tile16_pm1", [15, 16, 17], [[31, 32], [33], [16, 1]]),
    ("tile64_pm1", [63, 1, 64], [[65, 1], [63, 64, 2], [1]]),
    ("tile128_pm1", [127, 0], [[129, 128], [1, 127]]),
    ("exact_256", [64], [[64, 64, 64]]),
    ("empty_prefixes", [0, 0, 0, 0], [[5, 9], [17], [1, 2, 3], [64]]),
    ("many_tiny_docs", [0, 1, 2, 1, 0, 2, 1, 0, 1, 2, 0, 1] * 3,
     [[1], [2, 1], [1, 3], [1], [2, 2], [1], [3], [1, 1, 1], [2], [1, 2], [3], [1, 1]] * 3),
    ("eight_branches", [10, 1], [[1, 20, 3, 17, 16, 15, 2, 9], [1] * 8]),
    ("single_long_doc", [300], [[77]]),
    ("long_branches", [3], [[200, 190]]),
    # One-token documents and branches right at the fused kernel's chunk boundary (token 256).
    ("chunk_edge_docs", [254, 0, 0, 0], [[1], [1], [1], [5]]),
    ("chunk_edge_branch", [255], [[1, 1, 1, 3]]),
    ("chunk_edge_prefix", [256], [[2, 1]]),
    ("all_one_token_docs", [0] * 300, [[1]] * 300),
]


@pytest.mark.parametrize("cfg", [CPU_CFG, GPU_CFG, GPU_G7_CFG, ODD_CFG], ids=["cpu", "gpu", "gpu_g7", "odd"])
@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_layouts(name, prefix, branches, cfg, monkeypatch):
    _check(prefix, branches, cfg, monkeypatch)


def _random_lengths(rng: random.Random):
    n = rng.randint(1, 14)
    prefix = [rng.choice([0, 1, rng.randint(0, 90), rng.choice([15, 16, 17, 63, 64, 65])]) for _ in range(n)]
    branches = [[rng.choice([1, rng.randint(1, 60), rng.choice([31, 32, 33])]) for _ in range(rng.randint(1, 8))]
                for _ in range(n)]
    return prefix, branches


@pytest.mark.parametrize("seed", range(10))
def test_random_layouts(seed, monkeypatch):
    prefix, branches = _random_lengths(random.Random(seed))
    _check(prefix, branches, CONFIGS[seed % len(CONFIGS)], monkeypatch)


# Windows of 1 (each token sees itself), shorter than a tile, about a tile, and longer than most documents.
@pytest.mark.parametrize("window", [1, 5, 17, 70])
@pytest.mark.parametrize("cfg", [CPU_CFG, GPU_CFG, ODD_CFG], ids=["cpu", "gpu", "odd"])
@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_windowed_awkward_layouts(name, prefix, branches, cfg, window, monkeypatch):
    _check(prefix, branches, cfg, monkeypatch, window=window)


@pytest.mark.parametrize("seed", range(10))
def test_windowed_random_layouts(seed, monkeypatch):
    rng = random.Random(100 + seed)
    prefix, branches = _random_lengths(rng)
    _check(prefix, branches, CONFIGS[seed % len(CONFIGS)], monkeypatch, window=rng.choice([2, 16, 33, 64, 100]))


def test_windows_share_the_per_token_tables(monkeypatch):
    """Tables of two windows and of none on one layout: one per-token build, each window's schedules once."""
    prefix, branches = [20, 0, 33], [[13, 30, 1], [64], [1, 5, 8, 2]]
    layout = _check(prefix, branches, CPU_CFG, monkeypatch, window=9)
    a = sch.build_tables(layout, CPU_CFG.tile_shape, 40)
    b = sch.build_tables(layout, CPU_CFG.tile_shape)
    assert a.tokens is b.tokens is sch.token_tables(layout) and a.window == 40 and b.window is None
    assert sch.build_tables(layout, CPU_CFG.tile_shape, 40) is a
    _fused_only(layout, sch.table_key(CPU_CFG.tile_shape, 9), sch.table_key(CPU_CFG.tile_shape, 40),
                CPU_CFG.tile_shape)
    _assert_same(a, _reference(prefix, branches, CPU_CFG, monkeypatch, 40), "window 40")
    _assert_same(b, _reference(prefix, branches, CPU_CFG, monkeypatch), "no window")


def test_many_documents(monkeypatch):
    # More documents and branches than one step of the segment kernel (1024) and than one chunk compares at once:
    # 1100 one- or two-token documents, some with an empty prefix.
    rng = random.Random(5)
    prefix = [rng.choice([0, 1]) for _ in range(1100)]
    branches = [[1] * rng.choice([1, 1, 2]) for _ in range(1100)]
    _check(prefix, branches, CPU_CFG, monkeypatch)


def test_position_ids_first_then_two_configs(monkeypatch):
    """position_ids before any attention (two launches, per-token tables only), then the schedules of two configs
    from the cached segment table (two launches each)."""
    prefix, branches = [20, 0, 33], [[13, 30, 1], [64], [1, 5, 8, 2]]
    layout = _check(prefix, branches, GPU_G1_CFG, monkeypatch, position_ids_first=True)
    segs, tokens = layout.cached(tsch.Segments), layout.cached(sch.TokenTables)
    got = sch.build_tables(layout, SKEWED_CFG.tile_shape)
    assert layout.cached(tsch.Segments) is segs and got.tokens is tokens
    _fused_only(layout, GPU_G1_CFG.tile_shape, SKEWED_CFG.tile_shape)
    _assert_same(got, _reference(prefix, branches, SKEWED_CFG, monkeypatch), "second config")


def test_position_ids_match_definition(monkeypatch):
    layout = PrefixLayout.from_lengths([3, 0], [[2, 1], [4]])
    pos = position_ids(layout)
    assert pos.tolist() == [0, 1, 2, 3, 4, 3, 0, 1, 2, 3] and pos.dtype == torch.int64
    _fused_only(layout)
    assert torch.equal(layout.position_ids, pos)  # the layout's own definition


def test_cached_tables_are_reused(monkeypatch):
    layout = PrefixLayout.from_lengths([9], [[4, 6]])
    assert sch.build_tables(layout, CPU_CFG.tile_shape) is sch.build_tables(layout, CPU_CFG.tile_shape)


def test_flag(monkeypatch):
    cpu = torch.device("cpu")
    assert sch.fused_enabled(cpu)  # "1" under the interpreter
    monkeypatch.setenv(sch.ENV_FLAG, "0")
    assert not sch.fused_enabled(cpu) and not sch.fused_enabled(torch.device("cuda"))
    monkeypatch.delenv(sch.ENV_FLAG)
    assert not sch.fused_enabled(cpu) and sch.fused_enabled(torch.device("cuda"))
    layout = PrefixLayout.from_lengths([2], [[1, 3]])
    position_ids(layout)
    assert tsch.Segments not in layout.cached_keys() and "tok" in layout.cached_keys()  # the torch path


# ----------------------------------------------------------------------------------------------- through the kernels


@pytest.mark.parametrize("cfg", [CPU_CFG, SKEWED_CFG], ids=["cpu", "skewed"])
def test_attention_is_bitwise_the_same(cfg, monkeypatch):
    """Same schedules, same kernels: output and gradients equal the torch-scheduled run bit for bit."""
    prefix, branches = [31, 0, 5], [[1, 17, 33], [15], [2, 2, 2, 2]]
    g = torch.Generator().manual_seed(3)
    T = sum(prefix) + sum(map(sum, branches))
    q, k, v, do = (torch.randn(T, h, 16, generator=g) for h in (4, 2, 2, 4))

    def run(flag):
        monkeypatch.setenv(sch.ENV_FLAG, flag)
        layout = PrefixLayout.from_lengths(prefix, branches)
        xs = [x.clone().requires_grad_() for x in (q, k, v)]
        o = ta.triton_prefix_attention(*xs, layout, config=cfg)
        o.backward(do)
        assert (tsch.Segments in layout.cached_keys()) == (flag == "1")
        return [o.detach()] + [x.grad for x in xs]

    for name, a, b in zip(("out", "dq", "dk", "dv"), run("1"), run("0")):
        assert torch.equal(a, b), name


def test_prefix_attention_dispatch(monkeypatch):
    layout = PrefixLayout.from_lengths([9, 0], [[4, 6], [3]])
    q, k, v = (torch.randn(layout.total_tokens, 2, 16) for _ in range(3))
    out = prefix_attention(q, k, v, layout, backend="triton")
    assert tsch.Segments in layout.cached_keys()
    ref = prefix_attention(q, k, v, PrefixLayout.from_lengths([9, 0], [[4, 6], [3]]), backend="reference")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [None, True])
def test_tables_inside_a_compiled_graph(dynamic):
    """Inside a torch.compile graph the tables are built eagerly on a miss (the graph breaks there) and read on a hit,
    also with dynamic shapes (accelerate's ACCELERATE_DYNAMO_USE_DYNAMIC), and they are the tables of an eager call."""
    torch._dynamo.reset()
    layout = PrefixLayout.from_lengths([40, 3], [[9, 20], [5]])
    tile = CPU_CFG.tile_shape

    def f(x, tile):  # the tile sizes as inputs: under dynamic shapes dynamo makes such ints symbolic
        return x + sch.build_tables(layout, tile).fwd.sum()

    x = torch.zeros(3)
    miss = torch.compile(f, dynamic=dynamic)(x, tile)
    hit = torch.compile(f, dynamic=dynamic)(x, tile)
    want = sch.build_tables(PrefixLayout.from_lengths([40, 3], [[9, 20], [5]]), tile).fwd.sum()
    assert miss.tolist() == hit.tolist() == [want.item()] * 3


@pytest.mark.parametrize("groups,tokens,fwd_warps,dq_warps", [
    (1, 64, 4, 4), (2, 32, 4, 4), (3, 21, 4, 4), (4, 16, 4, 4), (5, 12, 4, 4), (6, 10, 4, 4), (7, 9, 4, 4),
    (8, 8, 4, 4), (12, 10, 8, 8), (16, 8, 8, 8)])
def test_gpu_default_config_packs_the_group_into_64_rows(groups, tokens, fwd_warps, dq_warps):
    # The forward and dq programs hold `tokens` query tokens x `groups` heads: as many tokens as fill 64 MMA rows on
    # one warpgroup (so that two programs share an SM), down to 8-token tiles; a group of 12 or 16 takes 128 rows on
    # two warpgroups.
    cfg = ta.default_config(128, torch.bfloat16, torch.device("cuda"), groups)
    assert (cfg.fwd_block_m, cfg.dq_block_m, cfg.fwd_warps, cfg.dq_warps) == (tokens, tokens, fwd_warps, dq_warps)
    rows = ta.common.packed_row_count(tokens, groups)
    assert rows == (64 if fwd_warps == 4 else 128) and rows - tokens * groups < groups
    assert (cfg.kv_block_m, cfg.kv_block_n, cfg.kv_warps) == (64, 64, 4)


def test_groups_past_the_packing_limit_get_the_config_of_the_group_the_kernels_run():
    # The launchers split a group of more than MAX_PACKED_GROUP query heads (KV heads repeated); the config, and so
    # the tables built ahead of a call (ops.attention_tables, CUDA graphs), must be those of the split group.
    from prefix_attn.triton.config import MAX_PACKED_GROUP, packed_group

    dev = torch.device("cuda")
    for groups in range(1, 129):
        g = packed_group(groups)
        assert groups % g == 0 and g <= MAX_PACKED_GROUP and (g == groups or groups > MAX_PACKED_GROUP)
        for dtype in (torch.bfloat16, torch.float32):
            assert ta.default_config(128, dtype, dev, groups) == ta.default_config(128, dtype, dev, g)
        assert ta.fp8_default_config(128, dev, groups) == ta.fp8_default_config(128, dev, g)
    assert [packed_group(x) for x in (48, 71, 64, 21)] == [16, 1, 16, 7]


@pytest.mark.parametrize("groups,tokens,warps", [(1, 64, 4), (4, 16, 4), (7, 18, 8), (8, 16, 8)])
def test_gpu_fp32_default_config_keeps_16_token_tiles(groups, tokens, warps):
    # fp32 keeps its measured floor of 16 tokens (8 warps past 64 rows); only the 16-bit tiles go down to 8.
    cfg = ta.default_config(128, torch.float32, torch.device("cuda"), groups)
    assert (cfg.fwd_block_m, cfg.dq_block_m, cfg.fwd_warps, cfg.dq_warps) == (tokens, tokens, warps, warps)
