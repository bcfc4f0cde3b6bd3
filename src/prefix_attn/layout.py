"""The packed prefix/branch layout: one definition that every backend and the data side share.

A packed row is a list of documents laid end to end. A document is a shared prefix (possibly empty) followed by
k >= 1 branches (each at least one token). Tokens are ordered document by document: the prefix, then branch 0,
branch 1, ...

Attention: a prefix token sees the earlier tokens of its own prefix (causal); a branch token
sees its document's whole prefix plus the earlier tokens of its own branch (causal). So query ``q`` may attend to the
keys in ``[lo1[q], hi1[q]) U [lo2[q], q]`` (for a prefix token the first range is empty), and key ``k`` is seen by the
queries ``[k, q_hi[k])`` (one contiguous range: a prefix key by the rest of its document, a branch key by the rest of
its branch).

Sliding windows (``window=W`` on the methods that take it): a window is measured in each sequence's own positions, as
transformers measures it in the unshared prompt + response: query q sees an allowed key k only if
``pos(q) - pos(k) < W``. A query's windowed keys are still two intervals: ``lo1`` rises to ``doc_start + pos(q) - W
+ 1`` (prefix keys are at positions 0..P-1) and ``lo2`` to ``q - W + 1`` (a branch's positions are contiguous with
its own tokens, as a prefix's are). A key's windowed queries are not: a prefix key within W positions of the prefix
end is seen by the first tokens of every branch (every branch restarts at position P). The exact, contiguous part is
``[k, min(q_hi, k + W))`` (the "dense" range: every query there is within W positions, since positions never grow
faster than token indices); beyond it such a key needs the per-element test on the positions.

Everything here is computed from the lengths with vectorized tensor ops on the layout's device: no Python loop over
tokens and no S x S work. Per-token and per-tile quantities are computed lazily and cached on the object
(``cached``), as are the tables other modules derive from them (the kernels' schedules, FlexAttention's block mask),
so the layers of one model forward share them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

_INT = torch.int64


def _as_int_list(values: Any, name: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    try:
        out = [int(v) for v in values]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a sequence of integers, got {values!r}") from e
    for v, orig in zip(out, values):
        if isinstance(orig, float) and orig != v:
            raise ValueError(f"{name} must hold integers, got {orig!r}")
    return out


def check_window(window: Any) -> int | None:
    """``window`` as an int >= 1 (or None: no window); ValueError otherwise."""
    if window is None:
        return None
    try:
        w = operator.index(window)
    except TypeError:
        w = 0
    if isinstance(window, bool) or w < 1:
        raise ValueError(f"a sliding window must be an integer >= 1 (or None), got {window!r}")
    return w


@dataclass(eq=False)
class PrefixLayout:
    """Lengths of a packed row of prefix-shared documents, and everything the attention backends derive from them.

    Build it with :meth:`from_lengths` (validates) or :meth:`from_dict` (the trusted, device-side rebuild of
    :meth:`to_dict`). The three length tensors live on the layout's device:

    - ``prefix_lens`` [D]: prefix length of each document (>= 0).
    - ``branches_per_doc`` [D]: number of branches of each document (>= 1).
    - ``branch_lens`` [NB]: lengths of all branches, document by document (>= 1 each).

    Host-side integers (known without a device sync): ``total_tokens``, ``num_docs``, ``num_branches``,
    ``max_doc_span`` (the longest document in its *unshared* form, prefix + longest branch: the largest position
    id + 1, which sliding-window checks need) and ``unshared_tokens`` (the row's tokens with each branch given its own
    copy of its document's prefix: what running each prompt + response alone costs, and the size of the keys a
    per-branch decomposition gathers).
    """

    prefix_lens: torch.Tensor
    branches_per_doc: torch.Tensor
    branch_lens: torch.Tensor
    total_tokens: int
    max_doc_span: int
    unshared_tokens: int
    _cache: dict = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_lengths(
        cls,
        prefix_lens: Sequence[int] | torch.Tensor,
        branch_lens: Sequence[Sequence[int]],
        device: torch.device | str | None = None,
    ) -> "PrefixLayout":
        """Validate host-side lengths and build the layout on ``device``.

        ``prefix_lens[d]`` is document d's prefix length; ``branch_lens[d]`` the list of its branch lengths.
        Raises ``ValueError`` naming the problem for bad input.
        """
        prefix = _as_int_list(prefix_lens, "prefix_lens")
        if isinstance(branch_lens, torch.Tensor):
            raise ValueError("branch_lens must be a list with one list of branch lengths per document")
        if len(prefix) == 0:
            raise ValueError("a layout needs at least one document (prefix_lens is empty)")
        if len(branch_lens) != len(prefix):
            raise ValueError(
                f"prefix_lens and branch_lens must have one entry per document: got {len(prefix)} prefix lengths "
                f"and {len(branch_lens)} branch-length lists"
            )
        flat: list[int] = []
        per_doc: list[int] = []
        max_span = unshared = 0
        for d, (p, bl) in enumerate(zip(prefix, branch_lens)):
            if p < 0:
                raise ValueError(f"document {d}: prefix length must be >= 0, got {p}")
            if isinstance(bl, (int, float)) or bl is None:
                raise ValueError(f"document {d}: branch_lens[{d}] must be a list of branch lengths, got {bl!r}")
            bl = _as_int_list(bl, f"branch_lens[{d}]")
            if len(bl) == 0:
                raise ValueError(f"document {d}: needs at least one branch, got none")
            for j, b in enumerate(bl):
                if b < 1:
                    raise ValueError(
                        f"document {d}, branch {j}: length must be >= 1 (a branch holds at least the token that opens "
                        f"it), got {b}"
                    )
            flat.extend(bl)
            per_doc.append(len(bl))
            max_span = max(max_span, p + max(bl))
            unshared += p * len(bl) + sum(bl)
        total = sum(prefix) + sum(flat)
        return cls(
            prefix_lens=torch.tensor(prefix, dtype=_INT, device=device),
            branches_per_doc=torch.tensor(per_doc, dtype=_INT, device=device),
            branch_lens=torch.tensor(flat, dtype=_INT, device=device),
            total_tokens=total,
            max_doc_span=max_span,
            unshared_tokens=unshared,
        )

    def to_dict(self) -> dict[str, Any]:
        """The lengths as a plain dict (tensors and ints), e.g. to travel inside a batch and be moved to a device."""
        return {
            "prefix_lens": self.prefix_lens,
            "branches_per_doc": self.branches_per_doc,
            "branch_lens": self.branch_lens,
            "total_tokens": self.total_tokens,
            "max_doc_span": self.max_doc_span,
            "unshared_tokens": self.unshared_tokens,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], device: torch.device | str | None = None) -> "PrefixLayout":
        """Rebuild from :meth:`to_dict` without validation (the dict came from a validated layout)."""
        mv = (lambda t: t.to(device, non_blocking=True)) if device is not None else (lambda t: t)
        return cls(
            prefix_lens=mv(d["prefix_lens"]),
            branches_per_doc=mv(d["branches_per_doc"]),
            branch_lens=mv(d["branch_lens"]),
            total_tokens=int(d["total_tokens"]),
            max_doc_span=int(d["max_doc_span"]),
            unshared_tokens=int(d["unshared_tokens"]),
        )

    def to(self, device: torch.device | str) -> "PrefixLayout":
        return PrefixLayout.from_dict(self.to_dict(), device)

    def padded(self, total_tokens: int) -> "PrefixLayout":
        """This layout with one more document at the end, filling the row up to ``total_tokens``: no prefix, one
        branch of ``total_tokens - self.total_tokens`` tokens (none added if that is 0). Every token of the original
        documents sees exactly what it saw before (documents never see each other), so their attention outputs are
        unchanged; the padding document attends only to itself. Used to give rows of different lengths one shape
        (CUDA graphs over length buckets)."""
        pad = total_tokens - self.total_tokens
        if pad < 0:
            raise ValueError(f"cannot pad a row of {self.total_tokens} tokens to {total_tokens}")
        if pad == 0:
            return PrefixLayout.from_dict(self.to_dict())
        one = self.prefix_lens.new_ones(1)
        return PrefixLayout(
            prefix_lens=torch.cat([self.prefix_lens, one * 0]),
            branches_per_doc=torch.cat([self.branches_per_doc, one]),
            branch_lens=torch.cat([self.branch_lens, one * pad]),
            total_tokens=total_tokens,
            max_doc_span=max(self.max_doc_span, pad),
            unshared_tokens=self.unshared_tokens + pad,
        )

    # ------------------------------------------------------------------ basic properties
    @property
    def device(self) -> torch.device:
        return self.prefix_lens.device

    @property
    def num_docs(self) -> int:
        return self.prefix_lens.numel()

    @property
    def num_branches(self) -> int:
        return self.branch_lens.numel()

    def cached(self, key: Hashable, build: Callable[[], Any] | None = None) -> Any:
        """What ``build()`` returned for ``key`` on this layout, built now if it was not yet; with ``build=None``
        only a look (None if absent). The tables derived from the lengths live here, one per key, for the layout's
        lifetime; each key belongs to the module that builds its value (a string for this module's own tables)."""
        value = self._cache.get(key)  # one read: inside a compiled graph a hit is a plain dict lookup
        if value is None and build is not None:
            value = self._cache[key] = build()
        return value

    def cached_keys(self) -> frozenset:
        """The keys of everything derived and cached so far (e.g. to check that a captured computation built
        nothing of its own)."""
        return frozenset(self._cache)

    # ------------------------------------------------------------------ per-document / per-branch offsets
    @property
    def branch_doc(self) -> torch.Tensor:
        """[NB] document index of each branch."""
        return self.cached(
            "branch_doc",
            lambda: torch.repeat_interleave(
                torch.arange(self.num_docs, device=self.device), self.branches_per_doc, output_size=self.num_branches
            ),
        )

    def _offsets(self):
        # Segments: per document, the prefix segment (maybe empty) then its branches.
        D, NB = self.num_docs, self.num_branches
        first_branch = torch.cumsum(self.branches_per_doc, 0) - self.branches_per_doc  # [D]
        prefix_seg = torch.arange(D, device=self.device) + first_branch  # segment index of each doc's prefix
        branch_seg = self.branch_doc + 1 + torch.arange(NB, device=self.device)  # segment index of each branch
        seg_len = torch.empty(D + NB, dtype=_INT, device=self.device)
        seg_len[prefix_seg] = self.prefix_lens
        seg_len[branch_seg] = self.branch_lens
        seg_start = torch.cumsum(seg_len, 0) - seg_len
        doc_start = seg_start[prefix_seg]
        branch_start = seg_start[branch_seg]
        doc_len = self.prefix_lens + torch.zeros(D, dtype=_INT, device=self.device).index_add_(
            0, self.branch_doc, self.branch_lens
        )
        return {
            "prefix_seg": prefix_seg,
            "branch_seg": branch_seg,
            "seg_len": seg_len,
            "seg_start": seg_start,
            "doc_start": doc_start,
            "doc_len": doc_len,
            "branch_start": branch_start,
        }

    @property
    def doc_starts(self) -> torch.Tensor:
        """[D] first token of each document."""
        return self.cached("offsets", self._offsets)["doc_start"]

    @property
    def doc_lens(self) -> torch.Tensor:
        """[D] tokens of each document (prefix + all branches)."""
        return self.cached("offsets", self._offsets)["doc_len"]

    @property
    def branch_starts(self) -> torch.Tensor:
        """[NB] first token of each branch."""
        return self.cached("offsets", self._offsets)["branch_start"]

    # ------------------------------------------------------------------ per-token quantities
    def _per_token(self):
        off = self.cached("offsets", self._offsets)
        D, NB, T = self.num_docs, self.num_branches, self.total_tokens
        nseg = D + NB
        dev = self.device
        seg_of_token = torch.repeat_interleave(torch.arange(nseg, device=dev), off["seg_len"], output_size=T)
        # Per-segment attributes.
        seg_doc = torch.empty(nseg, dtype=_INT, device=dev)
        seg_doc[off["prefix_seg"]] = torch.arange(D, device=dev)
        seg_doc[off["branch_seg"]] = self.branch_doc
        seg_is_prefix = torch.zeros(nseg, dtype=torch.bool, device=dev)
        seg_is_prefix[off["prefix_seg"]] = True
        seg_branch = torch.full((nseg,), -1, dtype=_INT, device=dev)
        seg_branch[off["branch_seg"]] = torch.arange(NB, device=dev)
        seg_end = off["seg_start"] + off["seg_len"]
        doc_start = off["doc_start"][seg_doc]
        prefix_end = doc_start + self.prefix_lens[seg_doc]
        doc_end = doc_start + off["doc_len"][seg_doc]
        # Allowed keys of a query: [lo1, hi1) U [lo2, q]. Prefix: [] U [doc_start, q]. Branch: prefix U [branch_start, q].
        seg_lo1 = doc_start
        seg_hi1 = torch.where(seg_is_prefix, doc_start, prefix_end)
        seg_lo2 = torch.where(seg_is_prefix, doc_start, off["seg_start"])
        # Queries that see a key: [k, q_hi): a prefix key by the rest of its document, a branch key by its branch.
        seg_q_hi = torch.where(seg_is_prefix, doc_end, seg_end)
        # Positions: prefix 0..P-1, every branch restarts at the prefix length.
        seg_pos0 = torch.where(seg_is_prefix, 0, self.prefix_lens[seg_doc])
        tok = torch.arange(T, device=dev)
        t = seg_of_token
        return {
            "doc": seg_doc[t],
            "branch": seg_branch[t],
            "lo1": seg_lo1[t],
            "hi1": seg_hi1[t],
            "lo2": seg_lo2[t],
            "q_hi": seg_q_hi[t],
            "position_ids": tok - off["seg_start"][t] + seg_pos0[t],
        }

    @property
    def position_ids(self) -> torch.Tensor:
        """[T] position ids: a prefix counts 0..P-1, every branch restarts at P, as if the document stood alone with
        that branch (``prefix_attn.position_ids`` gives the same from the attention's tables)."""
        return self.cached("tok", self._per_token)["position_ids"]

    @property
    def token_doc(self) -> torch.Tensor:
        """[T] document index of each token."""
        return self.cached("tok", self._per_token)["doc"]

    @property
    def token_branch(self) -> torch.Tensor:
        """[T] global branch index of each token, -1 for prefix tokens."""
        return self.cached("tok", self._per_token)["branch"]

    def biting_window(self, window: int | None) -> int | None:
        """``window`` if it cuts some allowed pair of this row, else None: a window of at least ``max_doc_span``
        positions never does (no two tokens of a document are that far apart), and the unwindowed tables serve."""
        window = check_window(window)
        return None if window is None or window >= self.max_doc_span else window

    def query_key_ranges(self, window: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lo1, hi1, lo2), each [T]: query q may attend to keys [lo1, hi1) U [lo2, q]; with ``window``, to those of
        them within ``window`` positions (module doc). An empty first range may have lo1 == hi1 anywhere."""
        window = check_window(window)
        pt = self.cached("tok", self._per_token)
        if window is None:
            return pt["lo1"], pt["hi1"], pt["lo2"]

        def build():
            q = torch.arange(self.total_tokens, device=self.device)
            # lo1 is the document's start for every token, the prefix's positions count from it.
            lo1 = torch.minimum(pt["lo1"] + (pt["position_ids"] - window + 1).clamp_min(0), pt["hi1"])
            return lo1, pt["hi1"], torch.maximum(pt["lo2"], q - window + 1)

        return self.cached(("tok", window), build)

    def key_query_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_lo, q_hi), each [T]: key k is seen by queries [q_lo, q_hi) = [k, q_hi)."""
        pt = self.cached("tok", self._per_token)
        return torch.arange(self.total_tokens, device=self.device), pt["q_hi"]

    def key_window_ranges(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(walk_hi, dense_hi), each [T], under a sliding ``window``: key k is seen by every query of
        ``[k, dense_hi[k])`` (``min(q_hi, k + window)``) and by none at or past ``walk_hi[k]``. The two differ for
        the prefix keys within ``window`` of their prefix's end (module doc), whose other queries in ``[k, walk_hi)
        = [k, q_hi)`` are those of the later branches' first tokens: the per-element test on the positions picks
        them."""
        window = check_window(window)

        def build():
            pt = self.cached("tok", self._per_token)
            k = torch.arange(self.total_tokens, device=self.device)
            dense = torch.minimum(pt["q_hi"], k + window)
            prefix_end = pt["lo1"] + self.prefix_lens[pt["doc"]]
            near_end = (pt["branch"] < 0) & (k + window > prefix_end)
            return torch.where(near_end, pt["q_hi"], dense), dense

        return self.cached(("keys", window), build)

    def allowed_pairs(self, window: int | None = None) -> int:
        """Number of (query, key) pairs the mask allows (for effective-FLOP counts). Syncs with the device."""
        lo1, hi1, lo2 = self.query_key_ranges(window)
        q = torch.arange(self.total_tokens, device=self.device)
        return int(((hi1 - lo1).clamp_min(0) + (q - lo2 + 1)).sum().item())

    def dense_mask(self, window: int | None = None) -> torch.Tensor:
        """[T, T] boolean mask (True = may attend). O(T^2): for tests and the reference backend only."""
        window = check_window(window)

        def build():
            lo1, hi1, lo2 = self.query_key_ranges(window)
            q = torch.arange(self.total_tokens, device=self.device)[:, None]
            k = torch.arange(self.total_tokens, device=self.device)[None, :]
            return ((k >= lo1[:, None]) & (k < hi1[:, None])) | ((k >= lo2[:, None]) & (k <= q))

        return self.cached("dense" if window is None else ("dense", window), build)

    # ------------------------------------------------------------------ tile schedules
    def query_tile_ranges(self, block_m: int, block_n: int, window: int | None = None) -> dict[str, torch.Tensor]:
        """Per query tile of ``block_m`` rows, the key tiles of ``block_n`` columns it must visit (under ``window``:
        those of the windowed ranges, so tiles wholly outside the window are never visited).

        Returns int32 tensors of shape [ceil(T / block_m)]:
        ``lo1, hi1``: key-tile range of the shared-prefix part; ``lo2, hi2``: key-tile range of the causal part (own
        branch or prefix). When the two overlap or touch, the first is empty and the second holds their union.
        ``full_lo2, full_hi2`` and ``full_lo1, full_hi1``: the tiles inside those ranges where *every* query of the
        tile sees *every* key of the tile (no per-element mask needed); empty ranges when none. Tiles of a query tile
        that spans several documents/branches are a superset of what any one query needs; the per-element mask
        (``query_key_ranges``) makes them exact. Work is O(T + tiles).
        """
        window = check_window(window)
        key = ("qtiles", block_m, block_n) if window is None else ("qtiles", block_m, block_n, window)
        return self.cached(key, lambda: self._query_tile_ranges(block_m, block_n, window))

    def _query_tile_ranges(self, bm: int, bn: int, window: int | None) -> dict[str, torch.Tensor]:
        T = self.total_tokens
        nqt = (T + bm - 1) // bm
        pad = nqt * bm - T
        lo1, hi1, lo2 = self.query_key_ranges(window)
        q = torch.arange(T, device=self.device)

        def tiles(x, fill):
            return torch.nn.functional.pad(x, (0, pad), value=fill).view(nqt, bm)

        big = T + 1
        # Empty first ranges (prefix tokens, or empty prefixes) must not widen the tile's first range.
        empty1 = hi1 <= lo1
        lo1_min = tiles(torch.where(empty1, big, lo1), big).amin(1)
        hi1_max = tiles(torch.where(empty1, -1, hi1), -1).amax(1)
        has1 = hi1_max > lo1_min
        lo2_min = tiles(lo2, big).amin(1)
        q_min = torch.arange(nqt, device=self.device) * bm
        q_max = torch.clamp(q_min + bm - 1, max=T - 1)
        # Key-tile ranges.
        t_lo1 = torch.where(has1, lo1_min // bn, 0)
        t_hi1 = torch.where(has1, (hi1_max + bn - 1) // bn, 0)
        t_lo2 = lo2_min // bn
        t_hi2 = q_max // bn + 1
        merge = has1 & (t_hi1 >= t_lo2)
        t_lo2 = torch.where(merge, torch.minimum(t_lo1, t_lo2), t_lo2)
        t_lo1 = torch.where(merge, 0, t_lo1)
        t_hi1 = torch.where(merge, 0, t_hi1)
        # Full tiles: every query sees every key. Causal part: keys [lo2_max, q_min] for all queries.
        lo2_max = tiles(lo2, -1).amax(1)
        f_lo2 = (lo2_max + bn - 1) // bn
        f_hi2 = (q_min + 1) // bn  # key tile j is full iff (j+1)*bn - 1 <= q_min
        f_hi2 = torch.maximum(f_hi2, f_lo2)
        # Prefix part: keys in [lo1_max, hi1_min) for all queries (only when every query has a first range).
        all1 = tiles(~empty1, True).all(1)
        lo1_max = tiles(lo1, -1).amax(1)
        hi1_min = tiles(hi1, big).amin(1)
        f_lo1 = torch.where(all1, (lo1_max + bn - 1) // bn, 0)
        f_hi1 = torch.where(all1, torch.maximum(hi1_min // bn, f_lo1), f_lo1)
        i32 = lambda x: x.to(torch.int32)  # noqa: E731
        return {
            "lo1": i32(t_lo1),
            "hi1": i32(t_hi1),
            "lo2": i32(t_lo2),
            "hi2": i32(t_hi2),
            "full_lo1": i32(f_lo1),
            "full_hi1": i32(f_hi1),
            "full_lo2": i32(f_lo2),
            "full_hi2": i32(f_hi2),
        }

    def key_tile_ranges(self, block_n: int, block_m: int, window: int | None = None) -> dict[str, torch.Tensor]:
        """Per key tile of ``block_n`` columns, the query tiles of ``block_m`` rows that see any of its keys.

        Returns int32 tensors [ceil(T / block_n)]: ``lo, hi`` (query-tile range; contiguous because each key is seen by
        one contiguous range of queries). For the backward's KV-major loop. Under ``window``, the range ends at the
        keys' ``walk_hi`` (``key_window_ranges``): exact but for the tiles holding prefix keys near the prefix's end,
        where it is a superset.
        """
        window = check_window(window)
        key = ("ktiles", block_n, block_m) if window is None else ("ktiles", block_n, block_m, window)

        def build():
            T = self.total_tokens
            nkt = (T + block_n - 1) // block_n
            pad = nkt * block_n - T
            q_hi = self.key_query_ranges()[1] if window is None else self.key_window_ranges(window)[0]
            k0 = torch.arange(nkt, device=self.device) * block_n
            q_hi_max = torch.nn.functional.pad(q_hi, (0, pad), value=-1).view(nkt, block_n).amax(1)
            return {
                "lo": (k0 // block_m).to(torch.int32),
                "hi": ((q_hi_max + block_m - 1) // block_m).to(torch.int32),
            }

        return self.cached(key, build)

    def block_mask_tables(self, block_size: int, window: int | None = None) -> dict[str, torch.Tensor]:
        """Dense per-tile tables in FlexAttention's ``BlockMask.from_kv_blocks`` format (square tiles), for the mask
        under ``window`` if one is given.

        ``kv_num_blocks`` [QB], ``kv_indices`` [QB, KB] (partial tiles), ``full_kv_num_blocks``, ``full_kv_indices``
        (tiles with no masked element). O(tiles^2) integers: tile-level, never token-level S x S.
        """

        window = check_window(window)

        def build():
            r = self.query_tile_ranges(block_size, block_size, window)
            nqt = r["lo2"].numel()
            nkt = (self.total_tokens + block_size - 1) // block_size
            j = torch.arange(nkt, device=self.device, dtype=torch.int32)[None, :]

            def inr(lo, hi):
                return (j >= lo[:, None]) & (j < hi[:, None])

            touched = inr(r["lo1"], r["hi1"]) | inr(r["lo2"], r["hi2"])
            full = (inr(r["full_lo1"], r["full_hi1"]) | inr(r["full_lo2"], r["full_hi2"])) & touched
            # The last key tile may run past the row's end: never call it full.
            if self.total_tokens % block_size:
                full[:, -1] = False
            partial = touched & ~full

            def table(m):
                num = m.sum(1, dtype=torch.int32)
                idx = torch.argsort((~m).to(torch.int8), dim=1, stable=True).to(torch.int32)
                return num, idx

            kv_num, kv_idx = table(partial)
            f_num, f_idx = table(full)
            assert kv_idx.shape == (nqt, nkt)
            return {"kv_num_blocks": kv_num, "kv_indices": kv_idx, "full_kv_num_blocks": f_num, "full_kv_indices": f_idx}

        key = ("blocktables", block_size) if window is None else ("blocktables", block_size, window)
        return self.cached(key, build)
