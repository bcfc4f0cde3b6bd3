"""The fused schedule builder compiled for the GPU against the torch path (the CPU tests run it in the interpreter).

Every table of ``build_tables`` (position ids included) must be bit-identical, for the GPU's own configs and
for rows far larger than the interpreter can take (16K tokens, thousands of documents).
Run on a CUDA machine: ``python -m pytest -m gpu tests/gpu -q``.
"""

from __future__ import annotations

import random

import pytest
import torch

from prefix_attn import PrefixLayout
from prefix_attn import schedule as sch
from prefix_attn import triton as ta
from prefix_attn.triton import tables as tsch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = torch.device("cuda")


def _tables(prefix, branches, cfg, flag, monkeypatch):
    monkeypatch.setenv(sch.ENV_FLAG, flag)
    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    out = sch.build_tables(layout, cfg.tile_shape)
    assert (tsch.Segments in layout.cached_keys()) == (flag == "1")
    return out


def _random_lengths(rng, tokens):
    prefix, branches, total = [], [], 0
    while total < tokens:
        p = rng.choice([0, 1, rng.randint(1, 300), rng.randint(100, 2000), 127, 128, 129])
        bl = [rng.choice([1, rng.randint(1, 64), rng.randint(60, 900), 63, 64, 65]) for _ in range(rng.choice([1, 2, 2, 8]))]
        prefix.append(p)
        branches.append(bl)
        total += p + sum(bl)
    return prefix, branches


CASES = {
    "random_16k": lambda rng: _random_lengths(rng, 16384),
    "random_2k": lambda rng: _random_lengths(rng, 2048),
    "twenty_docs_16k": lambda rng: ([299] * 20, [[257, 257]] * 20),
    "3000_tiny_docs": lambda rng: ([rng.choice([0, 1, 2]) for _ in range(3000)],
                                   [[1] * rng.choice([1, 2, 3]) for _ in range(3000)]),
}


@pytest.mark.parametrize("groups", [4, 1, 7], ids=["g4", "g1", "g7"])
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (64, torch.float32)],
                         ids=["d128-bf16", "d64-bf16", "d64-fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_equals_torch_path(case, d, dtype, groups, monkeypatch):
    prefix, branches = CASES[case](random.Random(list(CASES).index(case)))
    cfg = ta.default_config(d, dtype, DEV, groups)
    got = _tables(prefix, branches, cfg, "1", monkeypatch)
    ref = _tables(prefix, branches, cfg, "0", monkeypatch)
    names = ("ranges", "q_hi", "position_ids", "fwd", "kv", "dq")
    for k, a, b in zip(names, got.tensors(), ref.tensors(), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{k}: {a.dtype} {tuple(a.shape)} != {b.dtype} {tuple(b.shape)}"
        assert a.is_contiguous() and a.device.type == "cuda", k
        assert torch.equal(a, b), f"{k}: differs at {(a != b).nonzero()[:5].tolist()}"
