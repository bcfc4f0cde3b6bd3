"""GPU tests of the `sdpa` backend (torch's dense kernels on the per-branch decomposition) against float64, as the
other backends are held (output and the three gradients, tolerances as in test_triton_gpu.py), and of ``auto``'s
routing of rows of long prefixes to it."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import random_layout
from test_triton_gpu import AWKWARD, _check

from prefix_attn import PrefixLayout, prefix_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


def _sdpa(layout, backend="sdpa"):
    return lambda q, k, v: prefix_attention(q, k, v, layout, backend=backend)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("d,dtype", [(128, torch.bfloat16), (64, torch.bfloat16), (64, torch.float16)],
                         ids=["d128-bf16", "d64-bf16", "d64-fp16"])
def test_random_layouts(seed, d, dtype):
    layout = random_layout(random.Random(seed), tokens=random.Random(seed).choice([700, 1500, 2600]), device=DEV)
    hq, hkv = [(8, 2), (4, 4), (7, 1)][seed]
    _check(_sdpa(layout), layout, hq, hkv, d, dtype, seed + 3, label=f"sdpa seed {seed}")


@pytest.mark.parametrize("name,prefix,branches", AWKWARD, ids=[a[0] for a in AWKWARD])
def test_awkward_layouts(name, prefix, branches):
    layout = PrefixLayout.from_lengths(prefix, branches, device=DEV)
    _check(_sdpa(layout), layout, 8, 2, 128, torch.bfloat16, 1, label=name)


def test_auto_routes_long_prefixes(monkeypatch):
    """With the threshold lowered to this row's prefixes, ``auto`` runs it on the decomposition (and agrees with
    float64); above them, on triton."""
    from prefix_attn import sdpa

    layout = PrefixLayout.from_lengths([900, 700], [[300, 5, 64], [1, 200]], device=DEV)
    monkeypatch.setattr(sdpa, "DENSE_PREFIX_MIN", 700)
    assert sdpa.routes_here(layout)
    _check(_sdpa(layout, "auto"), layout, 8, 2, 128, torch.bfloat16, 5, label="auto, long prefixes")
    monkeypatch.setattr(sdpa, "DENSE_PREFIX_MIN", 701)
    assert not sdpa.routes_here(layout)
