"""PrefixDPOTrainer: trl.DPOTrainer with each pair packed as prompt-once + chosen + rejected, rows without padding.

A TRL user switches by changing the class name (and DPOConfig -> PrefixDPOConfig). What is TRL's stays TRL's: dataset
preparation (prompt extraction, chat templates, tokenization, the max_length filter), the loss for every
``loss_type`` and its options, the metrics, the reference-model handling (separate model, PEFT adapter disabled,
``precompute_ref_log_probs``, ``sync_ref_model``), checkpoints and resume. What changes is how the model is run:

1. the collator (``PrefixPackingCollator``) returns TRL's padded batch *and* one packed row of the same pairs;
2. the policy's and reference's forward (``enable_packed_forward``) run the packed row with prefix-shared attention
   and scatter the per-token log-probs back into the padded batch's shape, so TRL's ``_compute_loss`` reads the same
   numbers it would have computed itself, only computed once per prompt and without padding.

The padded batch is never run through the model; it costs a few small integer tensors per step.
"""

from __future__ import annotations

import copy
import logging
import time

import torch
from accelerate.utils import is_peft_model
from transformers import AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin
from trl import DPOConfig, DPOTrainer

from .config import PrefixDPOConfig
from .data.collator import PACKED_KEY, PrefixPackingCollator
from .modeling.attention import check_model_supported
from .modeling.packed import enable_packed_forward

logger = logging.getLogger(__name__)


def _as_prefix_config(args: DPOConfig | None, model) -> PrefixDPOConfig:
    if args is None:
        name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
        return PrefixDPOConfig(output_dir=f"{name.split('/')[-1]}-PrefixDPO")
    if isinstance(args, PrefixDPOConfig):
        return args
    if isinstance(args, DPOConfig):  # a plain DPOConfig: keep every field, add ours at their defaults
        fields = {k: v for k, v in args.__dict__.items() if k in DPOConfig.__dataclass_fields__ and
                  DPOConfig.__dataclass_fields__[k].init}
        return PrefixDPOConfig(**fields)
    raise TypeError(f"args must be a PrefixDPOConfig (or trl.DPOConfig), got {type(args).__name__}")


class PrefixDPOTrainer(DPOTrainer):
    """Drop-in replacement for ``trl.DPOTrainer`` (same constructor), training on prefix-shared packed rows.

    Differences from TRL, all by design: ``compute_metrics`` is not supported (TRL deprecated it; the logits it needs
    are never built here), and evaluation always computes the loss only (``prediction_loss_only``).
    """

    _tag_names = ["trl", "dpo", "prefixdpo"]

    def __init__(
        self,
        model,
        ref_model=None,
        args: PrefixDPOConfig | DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
    ):
        args = _as_prefix_config(args, model)
        if compute_metrics is not None:
            raise ValueError(
                "compute_metrics is not supported by PrefixDPOTrainer: it needs full-vocabulary logits, which the "
                "packed path never builds (TRL deprecates it too). The DPO metrics (rewards/*, logps/*) are logged."
            )
        if data_collator is not None:
            raise ValueError(
                "PrefixDPOTrainer builds its own collator (the packed rows are its whole point); pass data_collator=None"
            )
        if not isinstance(model, str):
            check_model_supported(model)
        # A reference model for a policy built in memory: a frozen copy of the initial policy. (TRL reloads it from
        # the policy's hub path, which an in-memory model does not have.)
        if (
            ref_model is None
            and not isinstance(model, str)
            and peft_config is None
            and not is_peft_model(model)
            and not args.precompute_ref_log_probs
        ):
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        # The collator needs the pad token before TRL's __init__ (which may precompute reference log-probs with it).
        if processing_class is None:
            path = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
            processing_class = AutoTokenizer.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError("processing_class must be a tokenizer (or a processor holding one)")
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad token nor an eos token; set tokenizer.pad_token")
            logger.warning("The tokenizer has no pad token; using its eos token %r (as TRL does)", tokenizer.eos_token)
            tokenizer.pad_token = tokenizer.eos_token
        collator = PrefixPackingCollator(
            pad_token_id=tokenizer.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            prefix_sharing=args.prefix_sharing,
        )
        self._prefix_installed = False
        self._throughput = {"pairs": 0, "tokens": 0, "time": None}
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._install_prefix_packing()

    # ------------------------------------------------------------------ setup
    def _install_prefix_packing(self):
        """Make the policy and the reference run packed rows (after TRL added its fused LM head to them)."""
        if self._prefix_installed:
            return
        policy = self.model.get_base_model() if is_peft_model(self.model) else self.model
        enable_packed_forward(policy, self.args.attn_backend)
        if self.ref_model is not None:
            enable_packed_forward(self.accelerator.unwrap_model(self.ref_model), self.args.attn_backend)
        self._prefix_installed = True

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Called from TRL's __init__: reference log-probs are precomputed through the same packed path.
        self._install_prefix_packing()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # ------------------------------------------------------------------ loss and metrics
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        stats = inputs[PACKED_KEY]["stats"]
        counts = torch.tensor(
            [stats["packed_tokens"], stats["unshared_tokens"], stats["padded_tokens"], stats["pairs"],
             stats["shared_pairs"]],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        packed, unshared, padded, pairs, shared = self.accelerator.gather_for_metrics(counts[None]).sum(0).tolist()
        self._metrics[mode]["prefix_sharing/tokens_saved_frac"].append(1.0 - packed / unshared)
        self._metrics[mode]["prefix_sharing/shared_pairs_frac"].append(shared / pairs)
        # Packed rows carry no padding; TRL's padded batch of the same pairs would have had this much.
        self._metrics[mode]["packing/padding_frac"].append(0.0)
        self._metrics[mode]["packing/trl_padding_frac"].append(1.0 - unshared / padded)
        if mode == "train":
            self._throughput["pairs"] += pairs
            self._throughput["tokens"] += packed
        return super()._compute_loss(model, inputs, return_outputs)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return super().prediction_step(model, inputs, True, ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            now = time.perf_counter()
            t0 = self._throughput["time"]
            if t0 is not None and now > t0:
                logs["throughput/pairs_per_second"] = self._throughput["pairs"] / (now - t0)
                logs["throughput/tokens_per_second"] = self._throughput["tokens"] / (now - t0)
            self._throughput.update(pairs=0, tokens=0, time=now)
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._throughput.update(pairs=0, tokens=0, time=time.perf_counter())
        return super().train(*args, **kwargs)
