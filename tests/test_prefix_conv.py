"""``prefix_attn.conv``: the packed causal short convolution equals the convolution of every sequence alone (prompt
+ response, zero padded on the left), forward and gradients, in float64; and the predecessor table's rule."""

import random

import pytest
import torch
import torch.nn.functional as F

from prefix_attn import PrefixLayout
from prefix_attn.conv import prefix_causal_conv1d, sequence_predecessors


def _alone(x, weight, bias, layout):
    """Every sequence's convolution on its own: [(prefix rows, branch rows, output)] per branch."""
    K = weight.shape[1]
    ds, bs = layout.doc_starts.tolist(), layout.branch_starts.tolist()
    out = []
    for b, (d, n) in enumerate(zip(layout.branch_doc.tolist(), layout.branch_lens.tolist())):
        p = int(layout.prefix_lens[d])
        rows = list(range(ds[d], ds[d] + p)) + list(range(bs[b], bs[b] + n))
        seq = x[rows]
        y = F.conv1d(seq.t()[None], weight[:, None], bias, padding=K - 1, groups=x.shape[1])[0, :, : len(rows)].t()
        out.append((rows, y))
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_packed_conv_equals_each_sequence_alone(seed, kernel):
    # Prefixes empty, shorter and longer than the kernel; branches of one token up to several kernels.
    rng = random.Random(seed)
    n = rng.randint(1, 4)
    layout = PrefixLayout.from_lengths([rng.choice([0, 1, 2, rng.randint(0, 9)]) for _ in range(n)],
                                       [[rng.randint(1, 7) for _ in range(rng.randint(1, 4))] for _ in range(n)])
    g = torch.Generator().manual_seed(seed)
    x, weight, bias = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                       for s in ((layout.total_tokens, 5), (5, kernel), (5,)))
    got = prefix_causal_conv1d(x, weight, bias, layout)
    seqs = _alone(x, weight, bias, layout)
    for rows, y in seqs:
        torch.testing.assert_close(got[rows], y, rtol=1e-12, atol=1e-12)
    # Gradients: a loss over every sequence's outputs (prefix outputs once per sequence, as the unshared runs count
    # them) against the packed outputs, each read once per sequence that holds it.
    w = torch.randn(layout.total_tokens, 5, generator=g, dtype=torch.float64)
    want = torch.autograd.grad(sum((y * w[rows]).sum() for rows, y in seqs), (x, weight, bias))
    got_loss = sum((got[rows] * w[rows]).sum() for rows, _ in seqs)
    for a, b in zip(torch.autograd.grad(got_loss, (x, weight, bias)), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_predecessors_follow_each_sequence():
    # Document 0: prefix [0, 1, 2], branches [3, 4] and [5]; document 1: no prefix, branch [6, 7].
    layout = PrefixLayout.from_lengths([3, 0], [[2, 1], [2]])
    T = layout.total_tokens
    pred = sequence_predecessors(layout, 2)
    assert pred[0].tolist() == [T, 0, 1, 2, 3, 2, T, 6]  # branch [5] reads the prefix's end, not branch [3, 4]
    assert pred[1].tolist() == [T, T, 0, 1, 2, 1, T, T]
    assert sequence_predecessors(layout, 2) is pred  # cached on the layout
