"""The packed forward: run a model on one prefix-shared row and hand back TRL's per-token view.

``enable_packed_forward(model, backend)`` wraps the instance's forward (the one TRL's ``add_fused_lm_head`` installs;
no class is patched). A call that carries ``prefix_packed`` (from ``PrefixPackingCollator``) runs the backbone once
on the packed row with the layout passed down to attention, scores only the response positions through TRL's
chunked log-prob head (``shift_labels``), and gathers the per-token results into the [2B, L-1] shape of TRL's padded
batch (a branch that several sequences share feeds each of them; in the backward their gradients add up in it).
Everything else TRL does with them (losses, metrics) is then unchanged. An MoE model's load-balancing aux loss (TRL
asks for it with ``output_router_logits``) is a mean over the tokens of TRL's batch: the packed call weighs each
packed token by the number of TRL's sequences that hold it (``_token_uses``), so it is TRL's value. Calls without
``prefix_packed`` go to the
original forward with the model's original attention implementation (so ``generate`` works during and after
training); a packed call switches the implementation to ``prefix_attn`` and leaves it there, so that gradient
checkpointing's recomputation in the backward runs the same attention.
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch

from prefix_attn import PrefixLayout, position_ids

from ..data.collator import PACKED_KEY
from .attention import ATTN_NAME, install, language_model_attention, packed_row, set_language_model_attention
from .positions import multi_axis_position_ids, rope_index_function

_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _to_view(x: torch.Tensor | None, src: torch.Tensor, dst: torch.Tensor, shape) -> torch.Tensor | None:
    if x is None:
        return None
    flat = x.new_zeros(shape[0] * shape[1])
    # ``src`` repeats the positions of shared branches; indexing's backward accumulates over the repeats.
    return flat.index_put((dst,), x[0, src]).view(shape)


def _token_uses(layout: PrefixLayout, branch_uses: torch.Tensor) -> torch.Tensor:
    """[T] float32: how many of TRL's sequences hold each packed token (a branch token: its branch's uses; a prefix
    token: the sum over its document's branches)."""
    uses = branch_uses.to(layout.device, torch.float32)
    doc_uses = torch.zeros(layout.num_docs, dtype=torch.float32, device=layout.device).index_add_(
        0, layout.branch_doc, uses)
    b = layout.token_branch
    return torch.where(b >= 0, uses[b.clamp_min(0)], doc_uses[layout.token_doc])


@contextlib.contextmanager
def _aux_loss_weights(model, layout: PrefixLayout, packed: dict, kwargs: dict):
    """For a call that asks for router logits: TRL's fused forward takes the aux loss's token weights from its
    ``attention_mask`` keyword, which the backbone must not see (the layout is the mask); a pre-hook on the backbone
    drops it there."""
    if not kwargs.get("output_router_logits") or "branch_uses" not in packed:
        yield kwargs
        return

    def drop_mask(module, args, kw):
        kw.pop("attention_mask", None)
        return args, kw

    handle = model.base_model.register_forward_pre_hook(drop_mask, with_kwargs=True)
    try:
        yield {**kwargs, "attention_mask": _token_uses(layout, packed["branch_uses"])[None]}
    finally:
        handle.remove()


def packed_forward(model, packed: dict, *, backend: str = "auto", view_shape, inner_forward, **kwargs):
    """Run ``inner_forward`` (TRL's fused-head forward of ``model``) on a packed row; return its output in TRL's view
    shape."""
    device = packed["input_ids"].device
    # The policy's and the reference's forward get the same batch dict: build the layout (and, lazily, the
    # backends' schedules cached on it) once for both.
    layout = packed.get("_layout")
    if layout is None or layout.device != device:
        layout = packed["_layout"] = PrefixLayout.from_dict(packed["layout"], device)
    with _aux_loss_weights(model, layout, packed, kwargs) as call_kwargs, packed_row():
        out = inner_forward(
            input_ids=packed["input_ids"],
            position_ids=_position_ids(model, packed, layout),
            shift_labels=packed["shift_labels"],
            fused_lm_head=True,
            use_cache=False,
            prefix_layout=layout,
            prefix_attn_backend=backend,
            **packed.get("model_inputs", {}),  # image inputs (pixel_values, image_grid_thw, ...), each image once
            **call_kwargs,
        )
    src, dst = packed["src"], packed["dst"]
    for name in _PER_TOKEN:
        setattr(out, name, _to_view(getattr(out, name, None), src, dst, view_shape))
    if getattr(out, "label_mask", None) is not None:
        out.label_mask = _to_view(out.label_mask, src, dst, view_shape)
    return out


def _position_ids(model, packed: dict, layout: PrefixLayout) -> torch.Tensor:
    """The row's position ids: the layout's, or for a model with multi-axis rotary positions and a row that holds
    modality types (``mm_token_type_ids``, image rows of such a model), the model's own (``positions``). Built once
    for the policy's and the reference's forward."""
    cached = packed.get("_position_ids")
    if cached is not None and cached.device == layout.device:
        return cached
    rope_index = rope_index_function(model) if "mm_token_type_ids" in packed else None
    if rope_index is None:
        pos = position_ids(layout).unsqueeze(0)
    else:
        pos = multi_axis_position_ids(rope_index, packed["input_ids"][0], packed["mm_token_type_ids"][0], layout,
                                      packed.get("model_inputs", {}).get("image_grid_thw"))
    packed["_position_ids"] = pos
    return pos


def _adapter_probe(model):
    """One PEFT tuner layer inside ``model`` (None without PEFT): its state says whether adapters are switched off."""
    for m in model.modules():
        if hasattr(m, "disable_adapters") and hasattr(m, "active_adapters") and hasattr(m, "merged"):
            return m
    return None


def is_reference_call(model) -> bool:
    """Whether this forward of ``model`` computes reference log-probs.

    True for a separate reference model, for the policy while the trainer uses it as its own reference
    (``reference_mode``: precomputing reference log-probs without a reference model), and for a PEFT policy run
    without gradients with its adapters disabled or with TRL's ``"ref"`` adapter active (how TRL gets the reference
    from a PEFT model)."""
    if model._prefixdpo_is_reference or model._prefixdpo_force_reference:
        return True
    probe = model._prefixdpo_adapter_probe
    if probe is None or torch.is_grad_enabled():
        return False
    return bool(probe.disable_adapters) or list(probe.active_adapters) == ["ref"]


def enable_packed_forward(model, backend: str = "auto", ref_backend: str | None = None,
                          reference: bool = False) -> None:
    """Install prefix-shared attention into ``model`` and make its forward accept ``prefix_packed`` (idempotent).

    ``model`` must already carry TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``): the packed call
    scores response positions through it. ``backend`` runs the policy's packed calls, ``ref_backend`` (default: the
    same) those that compute reference log-probs (``is_reference_call``); ``reference=True`` marks a separate
    reference model, whose every call is one.
    """
    already = getattr(model, "_prefixdpo_backend", None) is not None
    model._prefixdpo_backend = backend
    model._prefixdpo_ref_backend = ref_backend or backend
    model._prefixdpo_is_reference = reference
    if already:
        return
    model._prefixdpo_force_reference = False
    model._prefixdpo_adapter_probe = _adapter_probe(model)
    original_attn = language_model_attention(model)
    install(model)
    bound = model.forward
    # The forward this one wraps, called on ``self``: a deep copy of the model (a reference model made from an
    # installed policy) then runs its own weights, not the original's.
    if isinstance(bound, types.MethodType) and bound.__self__ is model:
        def inner_of(self):
            return types.MethodType(bound.__func__, self)
    else:
        def inner_of(self):
            return bound

    @functools.wraps(bound)
    def forward(self, *args, **kwargs):
        inner = inner_of(self)
        packed = kwargs.pop(PACKED_KEY, None)
        if packed is None:
            if language_model_attention(self) == ATTN_NAME:
                set_language_model_attention(self, original_attn)
            return inner(*args, **kwargs)
        if language_model_attention(self) != ATTN_NAME:
            set_language_model_attention(self, ATTN_NAME)
        # TRL's call passes the padded view (input_ids, attention_mask, labels); the packed row replaces it.
        view_ids = kwargs.pop("input_ids", None)
        if view_ids is None and args:
            view_ids = args[0]
        for unused in ("attention_mask", "labels", "fused_lm_head", "use_cache", "position_ids", "shift_labels"):
            kwargs.pop(unused, None)
        view_shape = (view_ids.shape[0], view_ids.shape[1] - 1)
        backend = self._prefixdpo_ref_backend if is_reference_call(self) else self._prefixdpo_backend
        return packed_forward(self, packed, backend=backend, view_shape=view_shape, inner_forward=inner, **kwargs)

    model.forward = types.MethodType(forward, model)


@contextlib.contextmanager
def reference_mode(model):
    """Within the block, ``model``'s packed calls compute reference log-probs (use its reference backend)."""
    prev = model._prefixdpo_force_reference
    model._prefixdpo_force_reference = True
    try:
        yield
    finally:
        model._prefixdpo_force_reference = prev
