"""Tile sizes and launch parameters of the Triton kernels, and the tuned defaults.

``TritonAttentionConfig``: the 16-bit forward and backward. ``FP8AttentionConfig``: the FP8 forward (and its
quantization). Both are frozen dataclasses of int/bool fields that travel through ``torch.library.custom_op`` as
``list[int]``. ``default_config`` / ``fp8_default_config`` pick from the tuned tables below (the sweeps behind them:
scripts/bench_attention.py, docs/PERFORMANCE.md); ``set_default_config`` / ``set_fp8_default_config`` override them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import triton

from ..schedule import TileShape


class IntFieldsConfig:
    """A frozen dataclass of int/bool fields that travels through a ``torch.library.custom_op`` as ``list[int]``."""

    def as_list(self) -> list[int]:
        return [int(getattr(self, f.name)) for f in fields(self)]

    @classmethod
    def from_list(cls, xs):
        return cls(**{f.name: bool(int(x)) if isinstance(f.default, bool) else int(x) for f, x in zip(fields(cls), xs)})


@dataclass(frozen=True)
class TritonAttentionConfig(IntFieldsConfig):
    """Tile sizes and launch parameters. ``fwd_*``: the forward (``fwd_block_m`` query TOKENS per tile, any
    number: the kernel packs all query heads of a KV head, so its MMA has ``fwd_block_m x Hq / Hkv`` rows, rounded up
    to a power of two); ``kv_*``: the KV-major backward (``kv_block_n`` keys per program, ``kv_block_m`` queries per
    step, powers of two); ``dq_*``: the dq kernel (``dq_block_m`` tokens, packed as the forward). ``fwd_tma`` /
    ``bwd_tma``: the forward's K/V and the backward's q/dO (KV-major kernel) and K/V (dq kernel) loads through TMA
    descriptors (Hopper or newer; ignored elsewhere). ``bwd_gluon``: the KV-major and dq kernels run their Gluon
    versions (``backward_gluon``) where those apply (Hopper, 16-bit, head dim 64 or 128, GQA groups up to 8, 64-row
    tiles, no soft-cap, window or lse gradient), the plain kernels elsewhere."""

    fwd_block_m: int = 16
    fwd_block_n: int = 64
    fwd_warps: int = 4
    fwd_stages: int = 3
    kv_block_m: int = 64
    kv_block_n: int = 128
    kv_warps: int = 8
    kv_stages: int = 2
    dq_block_m: int = 32
    dq_block_n: int = 64
    dq_warps: int = 8
    dq_stages: int = 2
    fwd_tma: bool = True
    bwd_tma: bool = True
    bwd_gluon: bool = False

    @property
    def tile_shape(self) -> TileShape:
        """The tile sizes the schedules are built for."""
        return TileShape(self.fwd_block_m, self.fwd_block_n, self.kv_block_m, self.kv_block_n, self.dq_block_m,
                         self.dq_block_n)


# The configs ``default_config`` chooses from. On a GPU the packed kernels' *_block_m (query tokens per tile) is then
# sized from the GQA group; the values here are those of a group of 4.
CONFIGS = {
    # 16-bit inputs on a GPU (head dims 64 and 128 alike): the fastest of the sweeps of scripts/bench_attention.py
    # --sweep on Hopper (docs/PERFORMANCE.md). Every kernel runs one warpgroup per program, so that two programs share
    # an SM and one's softmax runs under the other's MMAs: the overlap Triton gives on Hopper without warp
    # specialization.
    "cuda_16bit": TritonAttentionConfig(
        fwd_block_m=16, fwd_block_n=64, fwd_warps=4, fwd_stages=3, kv_block_m=64, kv_block_n=64, kv_warps=4,
        kv_stages=2, dq_block_m=16, dq_block_n=64, dq_warps=4, dq_stages=2, fwd_tma=True, bwd_tma=True,
        bwd_gluon=True),
    # fp32 inputs on a GPU: smaller tiles (twice the bytes per element).
    "cuda_fp32": TritonAttentionConfig(
        fwd_block_m=16, fwd_block_n=32, fwd_warps=4, fwd_stages=2, kv_block_m=32, kv_block_n=64, kv_warps=4,
        kv_stages=1, dq_block_m=16, dq_block_n=32, dq_warps=4, dq_stages=1, fwd_tma=False, bwd_tma=False),
    # The CPU interpreter: small tiles keep the tests fast and make short rows cross many tiles.
    "interpreter": TritonAttentionConfig(
        fwd_block_m=16, fwd_block_n=16, fwd_warps=4, fwd_stages=1, kv_block_m=16, kv_block_n=32, kv_warps=4,
        kv_stages=1, dq_block_m=16, dq_block_n=16, dq_warps=4, dq_stages=1, fwd_tma=True, bwd_tma=True),
}
# MMA rows the packed forward and dq programs aim at on a GPU: 64, one warpgroup (16 tokens x 4 heads, 8 x 8 in 16
# bits: the sweeps' fastest), or the next power of two that holds the kind's _MIN_TOKENS tokens of the group, with 8
# warps. The tile takes as many tokens as fit (rows // group: 9 tokens x 7 heads fill 63 of 64 rows), so a group
# that is not a power of two wastes few rows (common.packed_rows). fp32 keeps 16-token tiles (its 8-token tiles were
# never measured).
_PACKED_ROWS = 64
_MIN_TOKENS = {"cuda_16bit": 8, "cuda_fp32": 16}
_OVERRIDE: TritonAttentionConfig | None = None


def set_default_config(cfg: TritonAttentionConfig | None) -> None:
    """Use ``cfg`` for every call that passes no config (None restores the table)."""
    global _OVERRIDE
    _OVERRIDE = cfg


# The packed kernels run every query head of a KV head in one program, so a program's tiles grow with the GQA group.
# Past MAX_PACKED_GROUP query heads they outgrow an SM (compiled for sm_90a at the default configs: a group of 64
# needs 322 KB of shared memory in the dq kernel, an SM has 227). Such a group is split: the launchers repeat each KV
# head r times (``attention.split_large_groups``) so that every program sees at most MAX_PACKED_GROUP query heads.
# Exact (query head h still reads KV head h // group; autograd sums the repeats' gradients), at the K/V memory of the
# smaller group. Multi-query models with many heads (one KV head for 48 or 71 query heads) take this path.
MAX_PACKED_GROUP = 16


def packed_group(groups: int) -> int:
    """The query heads per KV head the packed kernels run for a GQA group of ``groups``: the group itself up to
    ``MAX_PACKED_GROUP``, else the group over the smallest r that divides it and brings it within the limit (the
    configs and the tables built ahead of a call are those of this group)."""
    groups = max(1, groups)
    if groups <= MAX_PACKED_GROUP:
        return groups
    return groups // next(d for d in range(2, groups + 1) if groups % d == 0 and groups // d <= MAX_PACKED_GROUP)


def default_config(head_dim: int, dtype: torch.dtype, device: torch.device, groups: int = 4) -> TritonAttentionConfig:
    """The config for ``dtype`` and ``groups`` query heads per KV head on ``device`` (``set_default_config``
    overrides it): that of the group the kernels run (``packed_group``). ``head_dim`` does not choose among the tuned
    configs today (64 and 128 got the same one)."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    if device.type != "cuda":
        return CONFIGS["interpreter"]
    kind = "cuda_16bit" if dtype in (torch.float16, torch.bfloat16) else "cuda_fp32"
    return _GPU_CONFIGS[kind, packed_group(groups)]


def _gpu_config(kind: str, g: int) -> TritonAttentionConfig:
    rows = max(_PACKED_ROWS, triton.next_power_of_2(_MIN_TOKENS[kind] * g))
    tokens = rows // g
    cfg = CONFIGS[kind]
    return replace(cfg, fwd_block_m=tokens, fwd_warps=cfg.fwd_warps if rows <= _PACKED_ROWS else 8,
                   dq_block_m=tokens, dq_warps=cfg.dq_warps if rows <= _PACKED_ROWS else 8)


# The configs of every group the kernels run (up to MAX_PACKED_GROUP), built once at import: dynamo traces through an
# lru_cache (it ignores the wrapper), so a cached builder would make a new config object inside every compiled graph;
# a lookup here returns an object that exists outside it.
_GPU_CONFIGS = {(kind, g): _gpu_config(kind, g) for kind in _MIN_TOKENS for g in range(1, MAX_PACKED_GROUP + 1)}


@dataclass(frozen=True)
class FP8AttentionConfig(IntFieldsConfig):
    """Tile sizes and launch parameters of the FP8 forward (and of its quantization: one scale per tile and head).

    ``block_m``: query TOKENS per tile (q's quantization tile per head); one program computes all Hq/Hkv query heads
    of a KV head, so the MMA has ``block_m * Hq/Hkv`` rows, rounded up to a power of two. ``block_n``: keys per tile
    (k's and v's quantization tile; >= 32 on a GPU, the fp8 wgmma's reduction depth for P @ V). ``tma``: K/V tiles
    through TMA descriptors (Hopper; ignored elsewhere). ``quant_warps``: the quantize launch's warps (4 spill
    registers at 128-row tiles of D=128)."""

    block_m: int = 16
    block_n: int = 64
    warps: int = 4
    stages: int = 4
    tma: bool = True
    quant_warps: int = 8


# The FP8 configs ``fp8_default_config`` chooses from. On a GPU ``block_m`` is then sized from the GQA group (64 MMA
# rows); the value here is that of a group of 4.
FP8_CONFIGS = {
    # Head dims 64 and 128 alike: the fastest of the sweep of scripts/bench_attention.py --fp8-sweep on Hopper
    # (docs/PERFORMANCE.md).
    "cuda": FP8AttentionConfig(block_m=16, block_n=64, warps=4, stages=4, tma=True, quant_warps=8),
    # The CPU interpreter: small tiles keep the tests fast and make short rows cross many tiles.
    "interpreter": FP8AttentionConfig(block_m=16, block_n=16, warps=4, stages=1, tma=True, quant_warps=8),
}
_FP8_OVERRIDE: FP8AttentionConfig | None = None


def set_fp8_default_config(cfg: FP8AttentionConfig | None) -> None:
    """Use ``cfg`` for every FP8 call that passes no config (None restores the table)."""
    global _FP8_OVERRIDE
    _FP8_OVERRIDE = cfg


def fp8_default_config(head_dim: int, device: torch.device, groups: int = 4) -> FP8AttentionConfig:
    """The FP8 config for ``groups`` query heads per KV head on ``device`` (``set_fp8_default_config`` overrides it):
    on a GPU the packed tile holds as many query tokens as make 64 MMA rows (at least 16; 8 warps beyond 64).
    ``head_dim`` does not choose among the tuned configs today (64 and 128 got the same one)."""
    if _FP8_OVERRIDE is not None:
        return _FP8_OVERRIDE
    if device.type != "cuda":
        return FP8_CONFIGS["interpreter"]
    return _FP8_GPU_CONFIGS[triton.next_power_of_2(packed_group(groups))]


def _fp8_gpu_config(g: int) -> FP8AttentionConfig:
    bm = max(64 // g, 16)
    return replace(FP8_CONFIGS["cuda"], block_m=bm, warps=4 if bm * g <= 64 else 8)


# Built once, as _GPU_CONFIGS: every power of two up to the largest group the kernels run, rounded up.
_FP8_GPU_CONFIGS = {2**i: _fp8_gpu_config(2**i) for i in range((MAX_PACKED_GROUP - 1).bit_length() + 1)}
