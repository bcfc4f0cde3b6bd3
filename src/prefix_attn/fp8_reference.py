"""Pure-torch references for the FP8 forward (``prefix_attn.triton.fp8``): the rotation, the quantization, the math.

The tests hold the Triton kernels to these: every kernel has a pure-torch reference of its arithmetic.

- ``rotation_matrix(D)``: ``R = diag(s) @ H_D / sqrt(D)``, H_D the Sylvester Hadamard matrix (+-1 entries), s a
  seeded vector of random signs. R is orthogonal, so ``(q R)(k R)^T = q k^T``; ``x R`` flips the signs of x's
  channels at random, then mixes every channel into every other with equal weight: an outlier channel's energy is
  spread evenly over all D channels (FlashAttention-3's "incoherent processing"). In the notation ``H @ diag(s)``
  (signs after the Hadamard), R is that matrix's transpose.
- ``quantize_reference``: one fp32 scale per (tile of ``block`` rows, head): ``scale = amax / 448`` (448 = e4m3's
  largest finite value; 1.0 for an all-zero tile), values ``round_e4m3(x * (1 / scale))``. The kernel does the same
  fp32 operations in the same order (IEEE division for the scale and its reciprocal), so without rotation the two
  agree bit for bit; with rotation the fp32 sums of the [D, D] product may differ in order (tensor cores), so they
  agree to one e4m3 step on the few elements that sit at a rounding boundary.
- ``fp8_attention_reference``: the kernel's arithmetic without its tiling: dequantized e4m3 q, k, v, fp32 scores and
  softmax, P shifted by 2^8 and rounded to e4m3 before ``P @ V``, l summed from the unrounded P. Its error against a
  float64 computation on the original inputs is the yardstick the kernel's error is held to (tests: at most 2x).

Quantization error bound (round to nearest, e4m3: 3 mantissa bits, smallest normal 2^-6, subnormal step 2^-9):
for ``y = x / scale`` with ``|y| <= 448``, ``|round(y) - y| <= max(2^-4 |y|, 2^-10)``; in x's units
``|deq - x| <= 2^-4 |x| + 2^-10 scale`` (plus a few fp32 roundings of the scaling: relative 2^-22).
"""

from __future__ import annotations

import functools
import math

import torch

from .layout import PrefixLayout

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
P_SHIFT_LOG2 = 8  # the kernel's P is 2^8 * softmax numerator (in [0, 256] <= 448)
ROTATION_SEED = 0  # the signs of the rotation: fixed, so runs are reproducible


def hadamard(n: int) -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (entries +-1, float32); n a power of two. ``H H^T = n I``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard: n must be a power of two, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


@functools.lru_cache(maxsize=None)
def _rotation_pm1_cpu(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
    return signs[:, None] * hadamard(n)


def rotation_pm1(n: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """``diag(s) @ H_n`` (+-1 entries, float32, CPU): the rotation without its 1/sqrt(n) (exact in any dtype)."""
    return _rotation_pm1_cpu(n, seed).clone()


def rotation_matrix(n: int, seed: int = ROTATION_SEED, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthogonal rotation ``R = diag(s) @ H_n / sqrt(n)`` applied to q and k (``x @ R``)."""
    return rotation_pm1(n, seed).to(torch.float64).div(math.sqrt(n)).to(dtype)


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e4m3 value (ties to even), in x's dtype. |x| must not exceed 464 (448 + half a step)."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def rotate_reference(x: torch.Tensor, seed: int = ROTATION_SEED) -> torch.Tensor:
    """``x @ R`` as the kernel computes it: fp32 ``x @ (diag(s) H)`` (exact products), then times fp32(1/sqrt(D))."""
    D = x.shape[-1]
    r = rotation_pm1(D, seed).to(x.device)
    return (x.float() @ r) * torch.tensor(D**-0.5, dtype=torch.float32, device=x.device)


def quantize_reference(x: torch.Tensor, block: int, rotate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize x [T, H, D] to e4m3 with one scale per (tile of ``block`` rows, head).

    Returns ``x8`` [T, H, D] float8_e4m3fn and ``scales`` [H, ceil(T / block)] float32. ``rotate``: quantize
    ``x @ rotation_matrix(D)`` instead (q and k only)."""
    T, H, D = x.shape
    xf = rotate_reference(x) if rotate else x.float()
    nb = -(-T // block)
    xp = torch.zeros(nb * block, H, D, dtype=torch.float32, device=x.device)
    xp[:T] = xf
    xp = xp.view(nb, block, H, D)
    amax = xp.abs().amax(dim=(1, 3))  # [nb, H]
    scale = torch.where(amax > 0, amax / torch.tensor(E4M3_MAX, device=x.device), torch.ones_like(amax))
    inv = torch.reciprocal(scale)
    x8 = (xp * inv[:, None, :, None]).to(torch.float8_e4m3fn).view(nb * block, H, D)[:T]
    return x8, scale.t().contiguous()


def dequantize_reference(x8: torch.Tensor, scales: torch.Tensor, block: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values ``x8 [T, H, D]`` with ``scales [H, nb]`` stand for, in ``dtype``."""
    T = x8.shape[0]
    s = scales.t().to(dtype).repeat_interleave(block, dim=0)[:T]  # [T, H]
    return x8.to(dtype) * s[:, :, None]


def quantization_error_bound(x: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    """Per-element bound on ``|dequantize(quantize(x)) - x|`` (module doc): 2^-4 |x| + 2^-10 scale, plus slack for
    the fp32 scaling (relative 2^-21 of |x| and of the scale)."""
    T = x.shape[0]
    s = scales.t().double().repeat_interleave(block, dim=0)[:T][:, :, None]
    a = x.double().abs()
    return (2.0**-4 + 2.0**-21) * a + (2.0**-10 + 2.0**-21) * s


def fp8_attention_reference(q, k, v, layout: PrefixLayout, softmax_scale: float | None = None, *,
                            rotate: bool = False, block_m: int, block_n: int,
                            dtype: torch.dtype = torch.float32, window: int | None = None) -> torch.Tensor:
    """The FP8 forward's arithmetic in pure torch (``dtype``), without its tiling/online softmax: q [T, Hq, D],
    k/v [T, Hkv, D] -> [T, Hq, D] float ``dtype``, under the sliding ``window`` (None: none). Same quantization
    (tiles of block_m / block_n rows) and P rounding as the kernel; differs from it only in rounding order (row max
    over all keys instead of running, sums)."""
    T, Hq, D = q.shape
    scale = D**-0.5 if softmax_scale is None else softmax_scale
    q8, qs = quantize_reference(q, block_m, rotate)
    k8, ks = quantize_reference(k, block_n, rotate)
    v8, vs = quantize_reference(v, block_n)
    qd = dequantize_reference(q8, qs, block_m, dtype)
    kd = dequantize_reference(k8, ks, block_n, dtype)
    vd = dequantize_reference(v8, vs, block_n, dtype)
    groups = Hq // k.shape[1]
    if groups > 1:
        kd, vd = kd.repeat_interleave(groups, 1), vd.repeat_interleave(groups, 1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) * scale
    s = s.masked_fill(~layout.dense_mask(window).to(q.device), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m) * 2.0**P_SHIFT_LOG2
    l = p.sum(-1, keepdim=True)
    p8 = round_e4m3(p.float()).to(dtype)
    return (torch.einsum("hqk,khd->qhd", p8, vd) / l.transpose(0, 1))


__all__ = ["E4M3_MAX", "P_SHIFT_LOG2", "ROTATION_SEED", "dequantize_reference", "fp8_attention_reference", "hadamard",
           "quantization_error_bound", "quantize_reference", "rotate_reference", "rotation_matrix", "rotation_pm1",
           "round_e4m3"]
