"""Backbones as CUDA graphs, one per row-length bucket: the reference's forward (``ref_cuda_graphs``) and the
policy's checkpointed forward (``policy_cuda_graphs``).

On short pairs a training step is bound by host time: the GPU finishes each op faster than Python issues the next
(docs/PERFORMANCE.md, HH-RLHF). A forward that records no autograd graph can be captured once per row length and
replayed: one launch instead of a few hundred ops per layer.

- The frozen reference model runs forward only, with fixed weights: its backbone (embedding, decoder layers, final
  norm) is replayed as it is.
- The policy under gradient checkpointing runs every decoder layer twice: once in the forward (nothing kept but each
  layer's input) and again in the backward, under autograd. The first of the two is what a graph can take over.
  ``_GraphedCheckpoint`` replays the decoder stack (layers and final norm) from the embeddings, keeps each layer's
  input, and in the backward recomputes layer by layer, eagerly, under autograd, exactly as reentrant checkpointing
  does. So the policy's forward costs one launch; its backward is what it was.

A graph needs fixed shapes and addresses. Rows are padded up to a multiple of ``BUCKET`` tokens with one padding
document (``PrefixLayout.padded``: it attends only to itself, so the real tokens' outputs do not change, and in the
backward its tokens get zero gradient, so they add exactly zero to the weights' gradients), and the layout's tables
(``prefix_attn.attention_tables``: per-token ranges, position ids, tile schedules; their shapes depend on the row
length only) are copied into the tensors the graph was captured with (``prefix_attn.use_tables``). A model with
sliding windows gets each window's tables too, for every window shorter than the bucket: the graph's layout claims a
document as long as the bucket (``_Tables``), so that the capture reads the windowed tables whatever row it was
captured on, and every row replayed refills them (an eager call skips a window that cuts no pair of its row; a graph
cannot decide that per row). The LM head and log-probs stay outside (TRL's head indexes by a boolean mask, which
needs the host).

Used only where it applies: a CUDA model, the ``triton`` attention backend, a row of at most ``max_tokens`` tokens,
plain ``input_ids`` without a cache; for the reference, no autograd; for the policy, autograd in training mode with
gradient checkpointing on, no dropout, no quantized weights, and a backbone whose only parameters are its embedding,
its decoder layers and its final norm, chained layer to layer (checked when a graph is captured). Everything else
runs the backbone as before. The graphs read the weights in place, so optimizer steps and in-place updates of the
reference (TRL's ``sync_ref_model``) are seen.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging

import torch
from transformers.modeling_outputs import BaseModelOutputWithPast

from prefix_attn import AttentionTables, PrefixLayout, attention_tables, position_ids, use_tables

from .attention import text_config

logger = logging.getLogger(__name__)

BUCKET = 256  # rows are padded up to a multiple of this many tokens: at most BUCKET - 1 tokens of extra work


def _capture(run, pool) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``run`` up on a side stream (lazy inits, Triton compiles), then capture it; returns (graph, its output).

    Autocast's weight cache is off inside: a cast cached before the capture would be read from memory the graph does
    not own (torch's make_graphed_callables asks the same)."""
    device = torch.cuda.current_device()
    autocast = torch.autocast("cuda", enabled=torch.is_autocast_enabled("cuda"),
                              dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), autocast:
        for _ in range(2):
            run()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool), autocast:
        out = run()
    return graph, out


def _attention_shape(model) -> tuple[int, int]:
    """(head_dim, query heads per KV head) of ``model``'s attention: what its layout tables are built for."""
    config = text_config(model.config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return head_dim, config.num_attention_heads // (getattr(config, "num_key_value_heads", None)
                                                     or config.num_attention_heads)


def _attention_windows(model) -> tuple[int, ...]:
    """The sliding windows of ``model``'s attention layers, from its config: ``sliding_window`` on the layers of type
    ``sliding_attention``, or on every layer of a model without layer types (Mistral). A layer that passes a window
    some other way makes the capture build tables the graph would not refill, which ``_Tables.check_captured``
    refuses."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return ()
    return (window,)


def _bucketed(layout: PrefixLayout, backend: str, dtype: torch.dtype, shape: tuple[int, int], max_tokens: int,
              windows: tuple[int, ...] = (), graphed: bool = True):
    """(bucket length, ``layout`` padded to it, the padded layout's tables: without a window, then under each of
    ``windows`` shorter than the bucket) for a row a graph can take; None for a row longer than ``max_tokens`` and,
    when ``graphed``, for q/k/v not in fp16/bf16 or a backend other than triton (its tables' shapes follow the
    documents). ``graphed=False`` (the policy stack's eager path) may give no tables."""
    total = -(-layout.total_tokens // BUCKET) * BUCKET
    if total > max_tokens or (graphed and dtype not in (torch.float16, torch.bfloat16)):
        return None
    padded = layout.padded(total)
    tables = attention_tables(padded, backend, dtype, *shape)
    if tables is None:
        return None if graphed else (total, padded, None)
    tables = [tables] + [attention_tables(padded, backend, dtype, *shape, window=w) for w in windows if w < total]
    return total, padded, tables


class _Tables:
    """A copy of ``layout`` whose tables are tensors of its own, refilled from another layout of the same length
    before each replay (the position ids are one of them). Its documents are claimed to span the whole row
    (``max_doc_span``), so that every window shorter than the row reads its windowed tables (module doc)."""

    def __init__(self, layout: PrefixLayout, tables: list[AttentionTables]):
        self.layout = PrefixLayout.from_dict({**layout.to_dict(), "max_doc_span": layout.total_tokens})
        tokens = tables[0].tokens.clone()
        self.tables = [dataclasses.replace(t.clone(), tokens=tokens) for t in tables]
        for t in self.tables:
            use_tables(self.layout, t)
        self.derived = self.layout.cached_keys()

    def fill(self, tables: list[AttentionTables]) -> None:
        for a, b in zip(self.tables, tables, strict=True):
            a.copy_(b)

    def check_captured(self) -> None:
        """After a capture: the graph read only the tables that ``fill`` refreshes. A table the model built during
        the capture (other q/k/v dtype or head size than the tables were made for) would be replayed stale."""
        built = self.layout.cached_keys() - self.derived
        if built:
            raise RuntimeError(f"the captured forward built layout tables of its own ({sorted(map(str, built))[:2]})")


class _Graph:
    """One captured backbone forward for rows of ``total`` tokens."""

    def __init__(self, backbone_forward, layout: PrefixLayout, tables: list[AttentionTables], total: int,
                 backend: str, pool):
        self.ids = torch.zeros((1, total), dtype=torch.long, device=layout.device)
        self.static = _Tables(layout, tables)
        layout = self.static.layout
        run = functools.partial(backbone_forward, input_ids=self.ids, position_ids=position_ids(layout)[None],
                                prefix_layout=layout, prefix_attn_backend=backend, use_cache=False)
        self.graph, out = _capture(run, pool)
        self.static.check_captured()
        self.out = out.last_hidden_state

    def __call__(self, input_ids: torch.Tensor, tables: list[AttentionTables]) -> torch.Tensor:
        T = input_ids.shape[1]
        self.ids[:, :T].copy_(input_ids)
        self.ids[:, T:].zero_()
        self.static.fill(tables)
        self.graph.replay()
        return self.out[:, :T].clone()  # the graph's output is overwritten by the next replay


def enable_reference_graphs(model, max_tokens: int = 4096) -> None:
    """Run ``model``'s backbone (``model.model`` for a causal LM) as CUDA graphs where that applies (module
    docstring). Idempotent; ``model`` must be the frozen reference model (its weights are read in place)."""
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None or getattr(backbone, "_prefixdpo_graphs", None) is not None:
        return
    shape, windows = _attention_shape(model), _attention_windows(model)
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
        ):
            return original(*args, **kwargs)
        backend = kwargs.get("prefix_attn_backend", "auto")
        bucket = _bucketed(layout, backend, dtype, shape, max_tokens, windows)
        if bucket is None:
            return original(*args, **kwargs)
        total, padded, tables = bucket
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


# ---------------------------------------------------------------------------------------------- the policy


@contextlib.contextmanager
def _unchecked(layers):
    """Run ``layers`` as plain modules: their own gradient checkpointing (transformers' ``GradientCheckpointingLayer``)
    is what the graphed stack replaces, in the capture and in the backward's recomputation alike."""
    layers = [m for m in layers if getattr(m, "gradient_checkpointing", False)]
    for m in layers:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in layers:
            m.gradient_checkpointing = True


def _detached(x, layout, memo: dict):
    """A recorded layer argument, made to outlive the next replay: tensors cloned (once each), the graph's layout
    swapped for ``layout`` (the same tables, in tensors of their own)."""
    if isinstance(x, torch.Tensor):
        if id(x) not in memo:
            memo[id(x)] = x.detach().clone()
        return memo[id(x)]
    if isinstance(x, PrefixLayout):
        return layout
    if isinstance(x, dict):
        return {k: _detached(v, layout, memo) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v, layout, memo) for v in x)
    return x


def _hidden(out):
    return out[0] if isinstance(out, tuple) else out


class _Stack:
    """The policy's decoder stack (every layer, then the final norm: the *segments*) from the embeddings, for rows of
    ``total`` tokens. Each replay writes every segment's input into ``inputs`` [segments, >= total, hidden]; the
    segments' other arguments (rotary tables, position ids, the layout) are recorded once.

    ``capture=False`` runs the same path without a graph (each replay is an eager run): the CPU tests' way in."""

    def __init__(self, backbone_forward, segments, layout: PrefixLayout, tables, total: int, backend: str, pool,
                 inputs: torch.Tensor, capture: bool):
        self.segments, self.inputs, self.total = segments, inputs, total
        self.embeds = inputs.new_zeros((1, total, inputs.shape[-1]))
        self.static = _Tables(layout, tables) if capture else None
        self._forward = functools.partial(backbone_forward, inputs_embeds=self.embeds, prefix_attn_backend=backend,
                                          use_cache=False)
        self.graph = None
        with self._recording() as seen:
            if capture:
                self.graph, out = _capture(functools.partial(self.run, self.static.layout), pool)
                self.static.check_captured()
            else:
                out = self.run(layout)
        # The recomputation chains segment to segment: that must be all the stack does between the embeddings and
        # its output (a model that scales or mixes hidden states between layers, or calls a layer twice, is refused).
        ins, outs = seen["in"], seen["out"]
        chained = (
            len(ins) == len(outs) == len(segments)
            and ins[0] is self.embeds
            and all(ins[i] is _hidden(outs[i - 1]) for i in range(1, len(segments)))
            and out.last_hidden_state is _hidden(outs[-1])
        )
        if not chained:
            raise RuntimeError("the backbone is not embeddings -> decoder layers -> norm, chained layer to layer")
        self.out = out.last_hidden_state

    def run(self, layout: PrefixLayout):
        return self._forward(position_ids=position_ids(layout)[None], prefix_layout=layout)

    @contextlib.contextmanager
    def _recording(self):
        seen = {"in": [], "out": []}
        self.rest = [None] * len(self.segments)

        def pre(i):
            def hook(module, args, kwargs):
                if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[:2] != (1, self.total):
                    raise RuntimeError(f"{type(module).__name__} takes its hidden states other than as the first "
                                       "argument [1, tokens, hidden]")
                self.inputs[i, : self.total].copy_(args[0][0])
                self.rest[i] = (args[1:], kwargs)
                if i == 0:  # a new run of the stack (the capture runs it three times): check the last one
                    seen["in"].clear()
                    seen["out"].clear()
                seen["in"].append(args[0])
            return hook

        handles = [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in enumerate(self.segments)]
        handles += [m.register_forward_hook(lambda m, a, o: seen["out"].append(o)) for m in self.segments]
        try:
            with torch.no_grad(), _unchecked(self.segments):
                yield seen
        finally:
            for h in handles:
                h.remove()

    def replay(self, h0: torch.Tensor, tables: list[AttentionTables] | None, layout: PrefixLayout):
        """Run the stack on ``h0`` [1, T <= total, hidden]; returns (the stack's output [1, T, hidden], every
        segment's input [segments, total, hidden], every segment's other arguments), all the caller's to keep."""
        T = h0.shape[1]
        self.embeds[:, :T].copy_(h0)
        self.embeds[:, T:].zero_()
        if self.graph is not None:
            self.static.fill(tables)
            self.graph.replay()
            out = self.out
        else:
            with self._recording():
                out = self.run(layout).last_hidden_state
        memo: dict = {}
        rest = [_detached(r, layout, memo) for r in self.rest]
        return out[:, :T].clone(), self.inputs[:, : self.total].clone(), rest


class _GraphedCheckpoint(torch.autograd.Function):
    """Reentrant checkpointing of the decoder stack with its forward replayed (module docstring). ``h0``: the
    embeddings [1, T, hidden]; returns the final norm's output [1, T, hidden]."""

    @staticmethod
    def forward(ctx, h0, stack: _Stack, layout: PrefixLayout, tables):
        out, ctx.inputs, ctx.rest = stack.replay(h0, tables, layout)
        ctx.stack, ctx.T = stack, h0.shape[1]
        ctx.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        return out

    @staticmethod
    def backward(ctx, grad):
        stack, inputs = ctx.stack, ctx.inputs
        g = grad.new_zeros((1, *inputs.shape[1:]))
        g[:, : ctx.T] = grad  # the padding document's outputs reach no loss: zero gradient
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast("cuda", enabled=enabled, dtype=dtype), _unchecked(stack.segments):
            for i in reversed(range(len(stack.segments))):
                x = inputs[i][None].detach().requires_grad_()
                args, kwargs = ctx.rest[i]
                y = _hidden(stack.segments[i](x, *args, **kwargs))
                torch.autograd.backward(y, g)
                g = x.grad
        ctx.inputs = ctx.rest = None
        return g[:, : ctx.T], None, None, None


def _policy_graphs_unsupported(model, backbone) -> str | None:
    """Why the policy's stack cannot be graphed (None: it can, as far as can be told before a capture)."""
    layers, norm = getattr(backbone, "layers", None), getattr(backbone, "norm", None)
    embed = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    if not isinstance(layers, torch.nn.ModuleList) or not isinstance(norm, torch.nn.Module) or embed is None:
        return f"{type(backbone).__name__} has no embeddings -> layers -> norm structure"
    covered = {id(p) for m in (embed, layers, norm) for p in m.parameters()}
    outside = [n for n, p in backbone.named_parameters() if p.requires_grad and id(p) not in covered]
    if outside:
        return f"trainable parameters outside the decoder layers ({outside[0]}, ...)"
    config = text_config(model.config)
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in backbone.modules()) or (
        getattr(config, "attention_dropout", 0.0) or 0.0
    ) > 0:
        return "dropout (the graph's masks would differ from the backward's recomputation)"
    quantized = not all(p.is_floating_point() for p in backbone.parameters())
    if getattr(model, "hf_quantizer", None) is not None or quantized:
        return "quantized weights"
    return None


def enable_policy_graphs(model, max_tokens: int = 4096, capture: bool = True) -> bool:
    """Run the policy ``model``'s checkpointed decoder stack through ``_GraphedCheckpoint`` where that applies
    (module docstring). Returns whether it is installed (False, with a warning, when the model cannot have it).
    Idempotent. ``capture=False``: the same path without CUDA graphs, on any device (tests)."""
    backbone = getattr(model, model.base_model_prefix, None)
    if backbone is None:
        return False
    if getattr(backbone, "_prefixdpo_stacks", None) is not None:
        return True
    reason = _policy_graphs_unsupported(model, backbone)
    if reason is not None:
        logger.warning("policy_cuda_graphs is not used: %s; the policy runs without CUDA graphs", reason)
        return False
    shape, windows = _attention_shape(model), _attention_windows(model)
    segments = [*backbone.layers, backbone.norm]
    embed = backbone.get_input_embeddings()
    original = backbone.forward
    stacks: dict[int, _Stack] = {}
    state = {"pool": None, "inputs": None}
    backbone._prefixdpo_stacks = stacks

    def forward(*args, **kwargs):
        layout = kwargs.get("prefix_layout")
        ids = kwargs.get("input_ids")
        if (
            args
            or layout is None
            or ids is None
            or ids.shape[0] != 1
            or kwargs.get("inputs_embeds") is not None
            or kwargs.get("past_key_values") is not None
            or not torch.is_grad_enabled()
            or not backbone.training
            or not any(getattr(m, "gradient_checkpointing", False) for m in backbone.layers)
            or (capture and (not ids.is_cuda or torch.cuda.is_current_stream_capturing()))
        ):
            return original(*args, **kwargs)
        backend = kwargs.get("prefix_attn_backend", "auto")
        # q/k/v come out of the projections in autocast's dtype, or else the weights'
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else embed.weight.dtype
        bucket = _bucketed(layout, backend, dtype, shape, max_tokens, windows, graphed=capture)
        if bucket is None:
            return original(*args, **kwargs)
        total, padded, tables = bucket
        h0 = embed(ids)
        stack = stacks.get(total)
        if stack is None:
            if state["inputs"] is None:
                state["pool"] = torch.cuda.graph_pool_handle() if capture else None
                state["inputs"] = h0.new_empty((len(segments), max_tokens, h0.shape[-1]))
            logger.info("policy_cuda_graphs: capturing the policy's decoder stack for rows of %d tokens", total)
            try:
                stack = stacks[total] = _Stack(original, segments, padded, tables, total, backend, state["pool"],
                                               state["inputs"], capture)
            except Exception as e:  # something in this model cannot be captured: run it as before, say so once
                logger.warning("policy_cuda_graphs: capturing the policy's decoder stack failed (%s: %s); it runs "
                               "without CUDA graphs", type(e).__name__, e)
                backbone.forward = original
                return original(*args, **kwargs)
        if not h0.requires_grad:  # a frozen embedding: the stack's gradients must still flow (as HF's checkpointing)
            h0 = h0.detach().requires_grad_()
        return BaseModelOutputWithPast(last_hidden_state=_GraphedCheckpoint.apply(h0, stack, padded, tables))

    backbone.forward = forward
    return True
