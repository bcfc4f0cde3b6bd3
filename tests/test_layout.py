"""PrefixLayout: the mask, positions and tile schedules against a brute-force reading of the layout contract (docs/DESIGN.md)."""

import random

import pytest
import torch

from prefix_attn import PrefixLayout


def brute_force(prefix_lens, branch_lens):
    """Token-by-token construction of the mask and positions straight from the layout contract (Python loops, tiny rows)."""
    info = []  # (doc, branch or -1, position)
    doc_spans = []
    for d, (p, bl) in enumerate(zip(prefix_lens, branch_lens)):
        start = len(info)
        info += [(d, -1, i) for i in range(p)]
        for j, b in enumerate(bl):
            info += [(d, (d, j), p + i) for i in range(b)]
        doc_spans.append((start, len(info)))
    T = len(info)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        dq, bq, _ = info[q]
        for k in range(q + 1):
            dk, bk, _ = info[k]
            if dk != dq:
                continue
            mask[q, k] = bk == -1 or bk == bq  # a prefix key (earlier: k <= q), or an earlier key of the own branch
            if bq == -1 and bk != -1:
                mask[q, k] = False
    return mask, torch.tensor([pos for _, _, pos in info])


def random_lengths(rng, docs=None, max_prefix=9, max_branch=7, max_k=4):
    docs = docs or rng.randint(1, 6)
    prefix = [rng.randint(0, max_prefix) for _ in range(docs)]
    branches = [[rng.randint(1, max_branch) for _ in range(rng.randint(1, max_k))] for _ in range(docs)]
    return prefix, branches


CASES = [
    ([0], [[1]]),  # a single token
    ([3], [[1, 1]]),  # branches of one token
    ([0, 0, 0], [[2], [1], [3]]),  # ordinary causal documents (k = 1, SFT packing)
    ([5, 1, 0], [[2, 3], [1, 1, 1, 1, 1, 1, 1, 1], [4, 2]]),  # up to 8 branches, empty prefix with 2 branches
]


@pytest.mark.parametrize("seed", range(12))
def test_mask_and_positions_match_definition(seed):
    rng = random.Random(seed)
    prefix, branches = CASES[seed] if seed < len(CASES) else random_lengths(rng)
    layout = PrefixLayout.from_lengths(prefix, branches)
    mask, pos = brute_force(prefix, branches)
    assert layout.total_tokens == mask.shape[0]
    assert torch.equal(layout.dense_mask(), mask)
    assert torch.equal(layout.position_ids, pos)
    assert layout.max_doc_span == int(pos.max()) + 1
    assert layout.allowed_pairs() == int(mask.sum())
    # Per-key query ranges: key k is seen by exactly the queries [k, q_hi[k]).
    q_lo, q_hi = layout.key_query_ranges()
    for k in range(layout.total_tokens):
        seen = mask[:, k].nonzero().flatten()
        assert seen.min() == q_lo[k] == k and seen.max() + 1 == q_hi[k]


@pytest.mark.parametrize("bm,bn", [(4, 4), (8, 4), (4, 8), (16, 16), (3, 5)])
@pytest.mark.parametrize("seed", range(8))
def test_tile_schedules_cover_the_mask(seed, bm, bn):
    rng = random.Random(100 + seed)
    prefix, branches = random_lengths(rng, docs=rng.randint(1, 9), max_prefix=20, max_branch=12)
    layout = PrefixLayout.from_lengths(prefix, branches)
    mask = layout.dense_mask()
    T = layout.total_tokens
    r = layout.query_tile_ranges(bm, bn)
    nkt = (T + bn - 1) // bn
    for i in range(r["lo2"].numel()):
        rows = mask[i * bm : (i + 1) * bm]
        visited = set(range(r["lo1"][i], r["hi1"][i])) | set(range(r["lo2"][i], r["hi2"][i]))
        assert r["hi1"][i] <= r["lo2"][i] or r["hi1"][i] == r["lo1"][i], "ranges must be disjoint and ordered"
        for j in range(nkt):
            tile = rows[:, j * bn : (j + 1) * bn]
            if tile.any():
                assert j in visited, f"query tile {i} misses key tile {j}"
        full = set(range(r["full_lo1"][i], r["full_hi1"][i])) | set(range(r["full_lo2"][i], r["full_hi2"][i]))
        for j in full:
            tile = rows[:, j * bn : (j + 1) * bn]
            assert j in visited and tile.shape[1] == bn and tile.all(), f"tile ({i},{j}) marked full but masked"
    kr = layout.key_tile_ranges(bn, bm)
    nqt = (T + bm - 1) // bm
    for j in range(nkt):
        cols = mask[:, j * bn : (j + 1) * bn]
        for i in range(nqt):
            if cols[i * bm : (i + 1) * bm].any():
                assert kr["lo"][j] <= i < kr["hi"][j]


def test_block_mask_tables_partition_touched_tiles():
    layout = PrefixLayout.from_lengths([40, 3, 0], [[30, 50], [2, 2, 9], [70]])
    t = layout.block_mask_tables(16)
    mask = layout.dense_mask()
    for i in range(t["kv_num_blocks"].numel()):
        partial = set(t["kv_indices"][i, : t["kv_num_blocks"][i]].tolist())
        full = set(t["full_kv_indices"][i, : t["full_kv_num_blocks"][i]].tolist())
        assert not partial & full
        for j in range((layout.total_tokens + 15) // 16):
            tile = mask[i * 16 : (i + 1) * 16, j * 16 : (j + 1) * 16]
            if tile.any():
                assert j in partial | full
            if j in full:
                assert tile.all()


def test_to_dict_roundtrip_and_device_build():
    layout = PrefixLayout.from_lengths([2, 0], [[1, 3], [2]])
    again = PrefixLayout.from_dict(layout.to_dict(), "cpu")
    assert torch.equal(again.dense_mask(), layout.dense_mask())
    assert again.total_tokens == 8 and again.num_docs == 2 and again.num_branches == 3


@pytest.mark.parametrize(
    "prefix,branches,match",
    [
        ([], [], "at least one document"),
        ([1, 2], [[1]], "one entry per document"),
        ([-1], [[1]], "prefix length must be >= 0"),
        ([1], [[0]], "length must be >= 1"),
        ([1], [[]], "at least one branch"),
        ([1], [3], "must be a list of branch lengths"),
        ([1.5], [[1]], "integers"),
        (["a"], [[1]], "integers"),
    ],
)
def test_bad_lengths_raise_clear_errors(prefix, branches, match):
    with pytest.raises(ValueError, match=match):
        PrefixLayout.from_lengths(prefix, branches)
