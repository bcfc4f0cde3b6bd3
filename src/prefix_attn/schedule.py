"""The tables the Triton kernels read for one packed row, as one object per tile shape.

For a ``TileShape`` (the kernels' tile sizes), ``AttentionTables`` holds:

- ``tokens`` (``TokenTables``, the same for every tile shape): ``ranges`` [3, T] int32, the keys ``[lo1, hi1) U
  [lo2, q]`` of each query (``PrefixLayout.query_key_ranges``); ``q_hi`` [T] int32, each key seen by the queries
  ``[k, q_hi)`` (``key_query_ranges``); ``position_ids`` [T] int64, the model's positions, which the packed forward
  reads from here on a GPU (``position_ids``), so that it and the attention share one build.
- ``fwd`` [n_q_tiles, 10] int32: per query tile, the key tiles the forward walks (``forward_schedule``).
- ``kv`` [n_k_tiles, 4] int32: per key tile, the query tiles the KV-major backward walks (``backward_schedule``).
- ``dq`` [n_dq_tiles, 10] int32: the forward's format at the dq kernel's tiles.

Under a sliding window (``AttentionTables.window``; ``PrefixLayout``'s module doc defines it), the schedules are those
of the windowed ranges, and two tables join: ``window_ranges`` [3, T] int32, the windowed ``[lo1, hi1) U [lo2, q]``
(``ranges`` is the one the kernels read: these, or ``tokens.ranges`` without a window), and ``kv_qmin``
[n_kv_query_tiles] int32, the smallest position in each query tile of the KV-major backward (its test for a query
tile wholly outside a key tile's window). The per-token tables are the same for every window; each window's tables are
built once per layout and shared by every layer with that window.

Two builders make them, bit for bit the same: the torch functions here (the reference: O(T + tiles) vectorized ops
from the layout's per-token and per-tile definitions; the path on CPU, for per-token tables asked for inside a
``torch.compile`` graph, and with ``PREFIX_ATTN_FUSED_SCHEDULE=0``), and on a GPU the fused Triton builder
(``prefix_attn.triton.tables``: two or three launches instead of about 200 small ops). Both results are cached on the
layout (``PrefixLayout.cached``) so that all layers of a forward share them: the per-token tables once per layout,
the schedules once per tile shape. ``build_tables`` always builds eagerly: inside a compiled graph a miss breaks the
graph (``_build_and_cache``) and a hit stays in it.

Every table's shape depends on the row length and the tile shape only, not on the documents: a CUDA graph captured
for one row length reads tables of its own (``use_tables``), refilled from each row's (``AttentionTables.copy_``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch

from .layout import PrefixLayout, check_window

ENV_FLAG = "PREFIX_ATTN_FUSED_SCHEDULE"


class TileShape(NamedTuple):
    """The kernels' tile sizes: the forward's ``fwd_m`` query tokens x ``fwd_n`` keys; the KV-major backward's
    ``kv_n`` keys x ``kv_m`` queries; the dq kernel's ``dq_m`` query tokens x ``dq_n`` keys. (A named tuple: the
    tables are keyed on it, also inside torch.compile, which traces tuples but not frozen dataclasses' __init__.)"""

    fwd_m: int
    fwd_n: int
    kv_m: int
    kv_n: int
    dq_m: int
    dq_n: int


class _Tensors:
    """Dataclasses of tensors that CUDA graphs clone and refill."""

    def tensors(self) -> tuple[torch.Tensor, ...]:
        out = []
        for f in fields(self):
            x = getattr(self, f.name)
            if isinstance(x, _Tensors):
                out.extend(x.tensors())
            elif isinstance(x, torch.Tensor):
                out.append(x)
        return tuple(out)

    def clone(self):
        """The same tables in tensors of their own."""
        return type(self)(**{f.name: _clone(getattr(self, f.name)) for f in fields(self)})

    def copy_(self, other) -> None:
        """Overwrite these tables with ``other``'s (a layout of the same row length, the same tile shape)."""
        for a, b in zip(self.tensors(), other.tensors(), strict=True):
            a.copy_(b)


def _clone(x):
    return x.clone() if isinstance(x, (torch.Tensor, _Tensors)) else x


@dataclass(frozen=True)
class TokenTables(_Tensors):
    """The per-token tables of a row (module doc)."""

    ranges: torch.Tensor  # [3, T] int32: lo1, hi1, lo2
    q_hi: torch.Tensor  # [T] int32
    position_ids: torch.Tensor  # [T] int64


@dataclass(frozen=True)
class AttentionTables(_Tensors):
    """Everything the Triton kernels read from a row's layout at one tile shape, under one sliding window or none
    (module doc)."""

    tile: TileShape
    tokens: TokenTables
    fwd: torch.Tensor  # [ceil(T / fwd_m), 10] int32
    kv: torch.Tensor  # [ceil(T / kv_n), 4] int32
    dq: torch.Tensor  # [ceil(T / dq_m), 10] int32
    window: int | None = None
    window_ranges: torch.Tensor | None = None  # [3, T] int32 (a window only)
    kv_qmin: torch.Tensor | None = None  # [ceil(T / kv_m)] int32 (a window only)

    @property
    def ranges(self) -> torch.Tensor:
        """[3, T] int32: the per-token key ranges the forward and dq kernels read."""
        return self.tokens.ranges if self.window is None else self.window_ranges

    @property
    def key(self):
        """The key these tables are cached under on their layout (``table_key``)."""
        return table_key(self.tile, self.window)


# ----------------------------------------------------------------------------------------------- cached on the layout


def table_key(tile: TileShape, window: int | None = None):
    """The layout cache's key of the tables at ``tile`` under ``window``."""
    return tile if window is None else (tile, window)


def token_tables(layout: PrefixLayout) -> TokenTables:
    """The layout's per-token tables (built on first use, then cached on it)."""
    return layout.cached(TokenTables, lambda: _build(layout, None)[0])


def build_tables(layout: PrefixLayout, tile: TileShape, window: int | None = None) -> AttentionTables:
    """The layout's tables at ``tile`` under the sliding ``window`` (None: none), built on first use, then cached on
    it. Timed by scripts/bench_attention.py."""
    window = check_window(window)
    key = table_key(tile, window)
    hit = layout.cached(key)
    return hit if hit is not None else _build_and_cache(layout, key, tile, window)


@torch.compiler.disable
def _build_and_cache(layout: PrefixLayout, key, tile: TileShape, window: int | None) -> AttentionTables:
    """Built outside any torch.compile graph: a graph that built the tables would have to write new dataclasses into
    the layout's cache as a side effect, which torch 2.11's dynamo fails to replay; a cache hit stays in the graph."""
    return layout.cached(key, lambda: _attention_tables(layout, tile, window))


def position_ids(layout: PrefixLayout) -> torch.Tensor:
    """[T] int64 position ids (``PrefixLayout.position_ids``), from the tables the attention reads: on a GPU the
    fused builder's, which the attention then reuses (the model forward asks first)."""
    return token_tables(layout).position_ids


def use_tables(layout: PrefixLayout, tables: AttentionTables) -> None:
    """Make ``layout`` read ``tables`` (its own row length; e.g. tensors a CUDA graph was captured with) as its
    per-token tables and its tables at ``tables.tile`` under ``tables.window``. The layout must not have built
    either yet; several windows' tables given one after the other must share one ``tokens``."""
    tokens = layout.cached(TokenTables)
    if (tokens is not None and tokens is not tables.tokens) or layout.cached(tables.key) is not None:
        raise ValueError("use_tables: the layout has built tables of its own already")
    if tables.tokens.position_ids.shape != (layout.total_tokens,):
        raise ValueError(f"use_tables: tables of {tables.tokens.position_ids.numel()} tokens for a layout of "
                         f"{layout.total_tokens}")
    layout.cached(TokenTables, lambda: tables.tokens)
    layout.cached(tables.key, lambda: tables)


def _attention_tables(layout: PrefixLayout, tile: TileShape, window: int | None) -> AttentionTables:
    tokens, (fwd, kv, dq, window_ranges, kv_qmin) = _build(layout, tile, window)
    return AttentionTables(tile, layout.cached(TokenTables, lambda: tokens), fwd, kv, dq, window, window_ranges,
                           kv_qmin)


def _build(layout: PrefixLayout, tile: TileShape | None, window: int | None = None):
    """(per-token tables, the schedules at ``tile`` under ``window`` or None): the fused builder's where it applies,
    else torch's. The schedules: (fwd, kv, dq, window_ranges, kv_qmin), the last two None without a window.
    Per-token tables already cached are reused, not rebuilt."""
    tokens = layout.cached(TokenTables)
    fused = _fused_builder(layout.device)
    out = fused(layout, tile, tokens, window) if fused is not None else None
    if out is not None:
        return out
    if tokens is None:
        tokens = TokenTables(torch.stack(layout.query_key_ranges()).to(torch.int32).contiguous(),
                             layout.key_query_ranges()[1].to(torch.int32).contiguous(), layout.position_ids)
    if tile is None:
        return tokens, None
    sched = (forward_schedule(layout, tile.fwd_m, tile.fwd_n, window),
             backward_schedule(layout, tile.kv_n, tile.kv_m, window), forward_schedule(layout, tile.dq_m, tile.dq_n,
                                                                                       window))
    if window is None:
        return tokens, (*sched, None, None)
    return tokens, (*sched, torch.stack(layout.query_key_ranges(window)).to(torch.int32).contiguous(),
                    query_tile_min_positions(layout, tile.kv_m))


def fused_enabled(device: torch.device) -> bool:
    """Whether the fused Triton builder serves layouts on ``device``: on CUDA devices unless
    ``PREFIX_ATTN_FUSED_SCHEDULE`` is ``0``; on the CPU with ``=1`` under ``TRITON_INTERPRET=1`` (the tests)."""
    flag = os.environ.get(ENV_FLAG, "")
    if flag == "0":
        return False
    if device.type == "cuda":
        return True
    return flag == "1" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def _fused_builder(device: torch.device):
    if not fused_enabled(device) or torch.compiler.is_compiling():
        return None
    try:
        from .triton.tables import fused_tables
    except ImportError:  # triton missing: the torch path
        return None
    return fused_tables


# ----------------------------------------------------------------------------------------------- torch builders


def forward_schedule(layout: PrefixLayout, block_m: int, block_n: int, window: int | None = None) -> torch.Tensor:
    """Per query tile, the key-tile segments the forward (and the dq kernel) walk (under ``window``: of the windowed
    ranges).

    Returns ``sched`` [n_q_tiles, 10] int32. Row i: range 1 (prefix part) ``masked [s0, s1), full [s1, s2), masked
    [s2, s3)``; range 2 (causal part, or the union when the layout merged the two) ``masked [s4, s5), full [s5, s6),
    masked [s6, s7), full [s7, s8), masked [s8, s9)``. The full sub-ranges are the layout's ``full_*`` tiles clipped
    to each range (subsets of full tiles stay full); in a merged range the prefix-full tiles come before the
    causal-full ones.
    """
    r = layout.query_tile_ranges(block_m, block_n, window)
    f1lo, f1hi, f2lo, f2hi = r["full_lo1"], r["full_hi1"], r["full_lo2"], r["full_hi2"]

    def clip(x, lo, hi):
        return torch.minimum(torch.maximum(x, lo), hi)

    lo1, hi1 = r["lo1"], r["hi1"]
    a1 = clip(f1lo, lo1, hi1)
    b1 = clip(f1hi, a1, hi1)
    lo2, hi2 = r["lo2"], r["hi2"]
    a2 = clip(f1lo, lo2, hi2)
    b2 = clip(f1hi, a2, hi2)
    c2 = clip(f2lo, b2, hi2)
    d2 = clip(f2hi, c2, hi2)
    return torch.stack([lo1, a1, b1, hi1, lo2, a2, b2, c2, d2, hi2], 1).to(torch.int32).contiguous()


def backward_schedule(layout: PrefixLayout, block_n: int, block_m: int, window: int | None = None) -> torch.Tensor:
    """Per key tile, the query-tile segments the KV-major backward walks.

    Returns ``sched`` [n_k_tiles, 4] int32: ``masked [s0, s1), full [s1, s2), masked [s2, s3)`` from
    ``key_tile_ranges``; a query tile is full when it lies inside every key's query range ``[k, q_hi[k])``, i.e. it
    starts at or after the tile's last key and ends before the smallest ``q_hi``. Under ``window``, the walk ends at
    the keys' ``walk_hi`` and full tiles end before the smallest ``dense_hi`` (``PrefixLayout.key_window_ranges``).
    """
    r = layout.key_tile_ranges(block_n, block_m, window)
    lo, hi = r["lo"].long(), r["hi"].long()
    T = layout.total_tokens
    nkt = lo.numel()
    pad = nkt * block_n - T
    q_hi = layout.key_query_ranges()[1] if window is None else layout.key_window_ranges(window)[1]
    qhi_min = torch.nn.functional.pad(q_hi, (0, pad), value=0).view(nkt, block_n).amin(1)  # padding: never full
    k_last = torch.arange(nkt, device=lo.device) * block_n + (block_n - 1)
    flo = torch.minimum(torch.maximum((k_last + block_m - 1) // block_m, lo), hi)
    fhi = torch.minimum(torch.maximum(qhi_min // block_m, flo), hi)
    return torch.stack([lo, flo, fhi, hi], 1).to(torch.int32).contiguous()


def query_tile_min_positions(layout: PrefixLayout, block_m: int) -> torch.Tensor:
    """[ceil(T / block_m)] int32: the smallest position id in each query tile of ``block_m`` tokens."""
    T = layout.total_tokens
    n = -(-T // block_m)
    pos = torch.nn.functional.pad(layout.position_ids, (0, n * block_m - T), value=torch.iinfo(torch.int32).max)
    return pos.view(n, block_m).amin(1).to(torch.int32)


__all__ = ["ENV_FLAG", "AttentionTables", "TileShape", "TokenTables", "backward_schedule", "build_tables",
           "forward_schedule", "fused_enabled", "position_ids", "query_tile_min_positions", "table_key",
           "token_tables", "use_tables"]
