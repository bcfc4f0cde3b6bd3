"""The reference model's backbone as CUDA graphs, one per row-length bucket (``ref_cuda_graphs``).

On short pairs a training step is bound by host time: the GPU finishes each op faster than Python issues the next
(docs/PERFORMANCE.md, HH-RLHF). The frozen reference model runs forward only, with fixed weights, so its backbone
(embedding, decoder layers, final norm) can be captured once per row length and replayed: one launch instead of a
few hundred ops per layer.

A graph needs fixed shapes and addresses. Rows are padded up to a multiple of ``BUCKET`` tokens with one padding
document (``PrefixLayout.padded``: it attends only to itself, so the real tokens' outputs do not change), and the
layout's tables (``prefix_attn.attention_tables``: per-token ranges, position ids, tile schedules; their shapes depend
on the row length only) are copied into the tensors the graph was captured with. The LM head and log-probs stay
outside (TRL's head indexes by a boolean mask, which needs the host).

Used only where it applies: no autograd, a CUDA model, the ``triton`` attention backend, a row of at most
``max_tokens`` tokens, plain ``input_ids`` without a cache. Everything else runs the backbone as before. The graphs
read the weights in place, so in-place updates of the reference (TRL's ``sync_ref_model``) are seen.
"""

from __future__ import annotations

import functools
import logging

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from prefix_attn import PrefixLayout, attention_tables

logger = logging.getLogger(__name__)

BUCKET = 256  # rows are padded up to a multiple of this many tokens: at most BUCKET - 1 tokens of extra work


class _Graph:
    """One captured backbone forward for rows of ``total`` tokens."""

    def __init__(self, backbone_forward, layout: PrefixLayout, tables: dict, total: int, backend: str, pool):
        device = layout.device
        self.ids = torch.zeros((1, total), dtype=torch.long, device=device)
        # A layout whose tables are this graph's own tensors (refilled before each replay); the position ids are one.
        self.layout = PrefixLayout.from_dict(layout.to_dict())
        self.layout._cache.update(_clone(tables))
        self.tables = {k: self.layout._cache[k] for k in tables}
        run = functools.partial(backbone_forward, input_ids=self.ids, position_ids=self.tables["position_ids"][None],
                                prefix_layout=self.layout, prefix_attn_backend=backend, use_cache=False)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture (lazy inits, Triton compiles)
            for _ in range(2):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = run().last_hidden_state

    def __call__(self, input_ids: torch.Tensor, tables: dict) -> torch.Tensor:
        T = input_ids.shape[1]
        self.ids[:, :T].copy_(input_ids)
        self.ids[:, T:].zero_()
        _copy(self.tables, tables)
        self.graph.replay()
        return self.out[:, :T].clone()  # the graph's output is overwritten by the next replay


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    return type(x)(_clone(v) for v in x)


def _copy(dst, src):
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, dict):
        for k in dst:
            _copy(dst[k], src[k])
    else:
        for a, b in zip(dst, src):
            _copy(a, b)


def enable_reference_graphs(model, max_tokens: int = 4096) -> None:
    """Run ``model``'s backbone (``model.model`` for a causal LM) as CUDA graphs where that applies (module
    docstring). Idempotent; ``model`` must be the frozen reference model (its weights are read in place)."""
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None or getattr(backbone, "_prefixdpo_graphs", None) is not None:
        return
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // (getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    original = backbone.forward
    graphs: dict[int, _Graph] = {}
    pool = [None]
    backbone._prefixdpo_graphs = graphs

    def forward(*args, **kwargs):
        layout = kwargs.get("prefix_layout")
        ids = kwargs.get("input_ids", args[0] if args else None)
        dtype = next(backbone.parameters()).dtype
        if (
            args
            or layout is None
            or ids is None
            or kwargs.get("inputs_embeds") is not None
            or kwargs.get("past_key_values") is not None
            or torch.is_grad_enabled()
            or not ids.is_cuda
            or ids.shape[0] != 1
            or torch.cuda.is_current_stream_capturing()
            or dtype not in (torch.float16, torch.bfloat16)
        ):
            return original(*args, **kwargs)
        total = -(-layout.total_tokens // BUCKET) * BUCKET
        if total > max_tokens:
            return original(*args, **kwargs)
        backend = kwargs.get("prefix_attn_backend", "auto")
        padded = layout.padded(total)
        tables = attention_tables(padded, backend, dtype, head_dim, groups)
        if tables is None:  # not the triton backend: its tables' shapes follow the documents
            return original(*args, **kwargs)
        graph = graphs.get(total)
        if graph is None:
            if pool[0] is None:
                pool[0] = torch.cuda.graph_pool_handle()
            logger.info("ref_cuda_graphs: capturing the reference backbone for rows of %d tokens", total)
            try:
                graph = graphs[total] = _Graph(original, padded, tables, total, backend, pool[0])
            except Exception as e:  # something in this model cannot be captured: run it as before, say so once
                logger.warning("ref_cuda_graphs: capturing the reference backbone failed (%s: %s); it runs without "
                               "CUDA graphs", type(e).__name__, e)
                backbone.forward = original
                return original(*args, **kwargs)
        return BaseModelOutputWithPast(last_hidden_state=graph(ids, tables))

    backbone.forward = forward
