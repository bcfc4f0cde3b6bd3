"""PrefixDPOTrainer: trl.DPOTrainer with each pair packed as prompt-once + chosen + rejected, rows without padding.

A TRL user switches by changing the class name (and DPOConfig -> PrefixDPOConfig). What is TRL's stays TRL's: dataset
preparation (prompt extraction, chat templates, tokenization, the max_length filter), the loss for every
``loss_type`` and its options, the metrics, the reference-model handling (separate model, PEFT adapter disabled,
``precompute_ref_log_probs``, ``sync_ref_model``), checkpoints and resume. What changes is how the model is run:

1. the collator (``PrefixPackingCollator``) returns TRL's padded batch *and* one packed row of the same pairs;
2. the policy's and reference's forward (``enable_packed_forward``) run the packed row with prefix-shared attention
   and gather the per-token log-probs into the padded batch's shape, so TRL's ``_compute_loss`` reads the same
   numbers it would have computed itself, only computed once per prompt (and once per response that several pairs
   of the micro-batch share) and without padding.

The padded batch is never run through the model; it costs a few small integer tensors per step.

``batching="token_budget"`` (off by default) changes only which pairs form a micro-batch and how micro-batch losses
are weighted; ``group_by_prompt`` (on for datasets that repeat prompts) only which pairs form a micro-batch; see
:class:`PrefixDPOTrainer`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import os
import time
from functools import partial

import torch
from accelerate.utils import is_peft_model
from torch.utils.data import DataLoader, IterableDataset
from transformers import AutoProcessor, AutoTokenizer, PreTrainedTokenizerBase, ProcessorMixin
from transformers.trainer_utils import has_length, rotate_checkpoints, seed_worker
from trl import DPOConfig, DPOTrainer

from . import checkpoints
from .config import PrefixDPOConfig, uses_fsdp
from .data.batching import TokenBudgetBatchSampler, dataset_pair_shapes, packed_lengths
from .data.collator import PACKED_KEY, PrefixPackingCollator
from .data.formats import ensure_pad_token, normalize_for_training, set_chat_template
from .data.grouping import PromptGroupedSampler, prompt_groups, use_prompt_groups
from .data.packing import pair_shapes
from .data.sharing import sharing_fractions
from .data.stats import report_prepared_dataset
from .data.vision import VisionPackingCollator, is_vision_dataset, measure_vision_pairs, vision_prompt_groups
from .modeling.attention import check_config_supported, check_model_supported
from .modeling.packed import enable_packed_forward, reference_mode
from .modeling.vision import check_vision_model, check_vision_processor
from .preemption import StopOnSignal

logger = logging.getLogger(__name__)


def _gather_ragged(gather, tensor):
    """``gather`` (all processes' tensors, concatenated on dim 0) for tensors whose dim 0 differs across processes."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
        return gather(tensor)
    sizes = gather(torch.tensor([tensor.shape[0]], device=tensor.device)).tolist()
    longest = max(sizes)
    pad = tensor.new_zeros((longest - tensor.shape[0], *tensor.shape[1:]))
    out = gather(torch.cat([tensor, pad])).view(len(sizes), longest, *tensor.shape[1:])
    return torch.cat([out[i, :n] for i, n in enumerate(sizes)])


def _rows(dataset) -> int | None:
    return len(dataset) if dataset is not None and not isinstance(dataset, dict) and hasattr(dataset, "__len__") else None


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


def _place_models_on_the_process_device(args, quantization_config) -> None:
    """Models TRL loads from a path under FSDP: ``device_map=None`` (the trainer then places them on this process's
    GPU). TRL sets it for DDP and DeepSpeed only; it reads the distributed type from ``args.distributed_state``, which
    says MULTI_GPU while the policy loads but FSDP once the accelerator exists, when the reference loads. The
    reference then got TRL's default, ``device_map="auto"``, and was spread over both GPUs of each process (seen on 2
    H200s: "index is on cuda:0, different from other tensors on cuda:1")."""
    kwargs = args.model_init_kwargs or {}
    if uses_fsdp(args) and quantization_config is None and "device_map" not in kwargs:
        args.model_init_kwargs = {**kwargs, "device_map": None}


def _check_fsdp_reference_loading(model, ref_model, args, peft_config) -> None:
    """FSDP with ``fsdp_cpu_ram_efficient_loading``: only rank 0 reads weights from disk and accelerate broadcasts
    the *policy's*; TRL wraps a reference model it loads from a path without that broadcast, so the other ranks'
    shards of it hold whatever memory they got (seen on 2 H200s: step-1 loss 1.27 instead of ln 2). Refuse it."""

    from transformers.utils import strtobool

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    if not strtobool(os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")):
        return
    loads_ref = isinstance(ref_model, str) or (
        ref_model is None and isinstance(model, str) and peft_config is None and not args.precompute_ref_log_probs
    )
    if loads_ref:
        raise ValueError(
            "FSDP with fsdp_cpu_ram_efficient_loading: true would leave the reference model's weights unloaded on "
            "every process but the first (TRL loads it without the broadcast accelerate gives the policy). Set "
            "fsdp_cpu_ram_efficient_loading: false in the accelerate config (recipes/accelerate/fsdp2.yaml does), "
            "or use LoRA (the reference is the policy without its adapter) or precompute_ref_log_probs: true."
        )


def keep_fsdp2_outputs_as_computed(plugin) -> None:
    """FSDP2 under accelerate with mixed_precision=bf16: drop the policy's ``output_dtype`` (parameters are still
    gathered in bf16 and gradients reduced as accelerate chose).

    accelerate 1.4-1.15 set ``output_dtype=bf16`` (1.16 leaves it None, and this does nothing), so every wrapped
    module's output is cast to bf16, the root model's too: the per-token log-probs that TRL's fused head computes in
    fp32 reach the loss in bf16 and their sum over a response is rounded to 8 bits (an ulp of 32 nats at -4500). Seen
    on 2 H200s: rewards exactly 0 on one GPU, noise of several nats on two. The reference model, which TRL wraps with
    the same plugin policy, follows.
    """
    policy = getattr(plugin, "mixed_precision_policy", None)
    if getattr(plugin, "fsdp_version", 1) == 2 and getattr(policy, "output_dtype", None) is not None:
        plugin.mixed_precision_policy = dataclasses.replace(policy, output_dtype=None)


def _check_vision_run(config, args) -> None:
    """Refusals for image data, from the config alone (before any weights or data load)."""
    check_vision_model(config)
    if args.ref_cuda_graphs or args.policy_cuda_graphs:
        raise ValueError("images: ref_cuda_graphs and policy_cuda_graphs capture the language model alone, without "
                         "the image inputs; turn them off for image datasets")
    if args.max_length is not None and args.truncation_mode == "keep_end":
        raise ValueError("images: truncation_mode='keep_end' is not supported for vision-language models (TRL refuses "
                         "it too: it can cut image tokens out of the prompt); use 'keep_start' or max_length=None")


class PrefixDPOTrainer(DPOTrainer):
    """Drop-in replacement for ``trl.DPOTrainer`` (same constructor), training on prefix-shared packed rows.

    Differences from TRL, all by design: ``compute_metrics`` is not supported (TRL deprecated it; the logits it needs
    are never built here), and evaluation always computes the loss only (``prediction_loss_only``).

    ``batching="token_budget"``: the train and eval dataloaders draw micro-batches from
    :class:`~prefixdpo.data.batching.TokenBudgetBatchSampler` (pairs of similar packed length, up to
    ``max_tokens_per_batch`` packed tokens per row; ``per_device_*_batch_size`` is not used), so micro-batches hold
    different numbers of pairs. The loss is weighted so that every pair of an optimizer step counts equally, as with
    TRL's fixed pairs per step. TRL's loss of a micro-batch is a mean over its pairs, L_m = (1/n_m) sum_i l_i;
    transformers' ``training_step`` divides it by the micro-batches G_p this process runs in the step
    (``current_gradient_accumulation_steps``), and the data-parallel all-reduce (DDP, FSDP, ZeRO) averages the W
    processes' gradients. Scaling L_m by s_m = n_m * G_p * W / N, with N the pairs of the whole step summed over the
    processes (counted in ``get_batch_samples``, which prefetches every micro-batch of the step), makes the gradient
    (1/W) sum_p (1/G_p) sum_m s_m grad L_m = (1/N) sum_i grad l_i: the per-pair mean over the step, exactly. The logged
    ``loss`` is that mean as well. Loss types that are not a mean of independent per-pair terms keep their
    micro-batch-level meaning: ``aot`` and ``aot_unpaired`` sort the log-ratios within a micro-batch (the pairing of
    sorted values depends on which pairs share it), ``sft`` averages over the chosen tokens of the micro-batch (so
    under this weighting a micro-batch's tokens count by its pair count, not by its token count), and ``use_weighting``
    and MoE aux losses are per micro-batch too; with micro-batches of varying content these differ from TRL's values
    for the same pairs, as they already do between different ``per_device_train_batch_size`` settings. TRL's logged
    metrics (``rewards/*``, ``logps/*``, ...) remain means of per-micro-batch means. Extra metrics in this mode:
    ``batching/pairs_per_micro_batch`` (pairs per packed row) and ``batching/row_fill`` (packed tokens / budget).

    ``group_by_prompt`` (``auto``: when the dataset has several pairs for some prompt): the train and eval samplers
    keep the pairs of one prompt together in micro-batches (:mod:`prefixdpo.data.grouping`), so the packed row runs
    the prompt once for all of them and every response they share once. In ``pairs`` mode the pairs per micro-batch
    stay ``per_device_*_batch_size``. Which pairs share a micro-batch does not change any per-pair loss term, so the
    training is TRL's for the same micro-batches. Metrics: ``prefix_sharing/tokens_saved_frac`` and
    ``prefix_sharing/responses_deduplicated_frac`` (:mod:`prefixdpo.data.sharing` defines both).

    Image datasets (an ``images`` or ``image`` column, a processor as ``processing_class``): the packed rows carry each
    prompt's image inputs once (:mod:`prefixdpo.data.vision`); supported models and refusals in
    :mod:`prefixdpo.modeling.vision`.
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
        # Every refusal comes here, before any weights load or any data is tokenized.
        if isinstance(model, str):
            from transformers import AutoConfig

            init_kwargs = args.model_init_kwargs or {}
            config = AutoConfig.from_pretrained(model, revision=init_kwargs.get("revision"),
                                                trust_remote_code=args.trust_remote_code)
            check_config_supported(config)
        else:
            config = model.config
            check_model_supported(model)
        if args.merge_adapters and peft_config is None and (isinstance(model, str) or not is_peft_model(model)):
            raise ValueError("merge_adapters: true needs a LoRA/PEFT run (use_peft: true, or a peft_config); a full "
                             "fine-tune saves the whole model already")
        self._vision = is_vision_dataset(train_dataset)  # an images/image column (data/vision.py)
        if self._vision:
            _check_vision_run(config, args)
        _check_fsdp_reference_loading(model, ref_model, args, peft_config)
        if isinstance(model, str) or isinstance(ref_model, str):
            _place_models_on_the_process_device(args, quantization_config)
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
            auto = AutoProcessor if self._vision else AutoTokenizer
            processing_class = auto.from_pretrained(path, trust_remote_code=args.trust_remote_code)
        if self._vision:
            check_vision_processor(processing_class)
        tokenizer = processing_class.tokenizer if isinstance(processing_class, ProcessorMixin) else processing_class
        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError("processing_class must be a tokenizer (or a processor holding one)")
        ensure_pad_token(tokenizer)
        if args.chat_template_path is not None:
            set_chat_template(processing_class, args.chat_template_path)
        # The same layout detection, normalization and bad-row accounting as the command line, for every dataset.
        normalize = functools.partial(normalize_for_training, processing_class=processing_class,
                                      on_bad_rows=args.on_bad_rows, num_proc=args.dataset_num_proc,
                                      pairs_from_ranks=args.pairs_from_ranks)
        train_dataset = normalize(train_dataset, name="train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {name: normalize(ds, name=name) for name, ds in eval_dataset.items()}
        else:
            eval_dataset = normalize(eval_dataset, name="eval")
        rows_before = {"train": _rows(train_dataset), "eval": _rows(eval_dataset)}
        if self._vision:
            collator = VisionPackingCollator(processing_class, max_length=args.max_length,
                                             prefix_sharing=args.prefix_sharing)
        else:
            collator = PrefixPackingCollator(
                pad_token_id=tokenizer.pad_token_id,
                max_length=args.max_length,
                truncation_mode=args.truncation_mode,
                prefix_sharing=args.prefix_sharing,
            )
        self._prefix_installed = False
        self._throughput = {"pairs": 0, "tokens": 0, "time": None}
        self._step_pairs = None  # token_budget: pairs of the current optimizer step, summed over processes
        self._train_batch_sampler = None
        self._train_pair_sampler = None  # group_by_prompt with batching="pairs"
        self._eval_pair_weight = None
        self._data_cache = {}
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
        # Pairs TRL's max_length rule dropped or will truncate, said now; none left is an error.
        for name, before in rows_before.items():
            prepared = self.train_dataset if name == "train" else self.eval_dataset
            # (TRL tokenizes no image dataset, so it drops none of its pairs for max_length.)
            if before is not None and prepared is not None and not isinstance(prepared, dict) and not self._vision:
                report_prepared_dataset(before, prepared, args.max_length, args.truncation_mode, name)
        self.stop_on_signal = StopOnSignal(self.accelerator)
        self.add_callback(self.stop_on_signal)

    # ------------------------------------------------------------------ setup
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        keep_fsdp2_outputs_as_computed(getattr(self.accelerator.state, "fsdp_plugin", None))

    def _install_prefix_packing(self):
        """Make the policy and the reference run packed rows (after TRL added its fused LM head to them)."""
        if self._prefix_installed:
            return
        policy = self._packed_policy()
        ref_backend = self.args.ref_attn_backend
        if ref_backend == "triton_fp8" and self.args.fp8_rotation:
            ref_backend = "triton_fp8_rotate"  # prefix_attn's name for the FP8 forward with Q/K rotated
        enable_packed_forward(policy, self.args.attn_backend, ref_backend)
        graphs_here = self._cuda_graphs_apply()
        if self.args.policy_cuda_graphs and graphs_here:
            from .modeling.graphs import enable_policy_graphs

            enable_policy_graphs(policy)
        if self.ref_model is not None:
            ref_model = self._unwrapped(self.ref_model)
            if self.args.use_liger_kernel:
                # transformers' Trainer applies Liger's kernels to the policy only (when training starts); the frozen
                # reference runs the same layers forward every step, so it gets them too (same config: TRL has
                # already switched off the fused linear cross-entropy, which would replace the forward).
                from transformers.integrations.liger import apply_liger_kernel

                apply_liger_kernel(ref_model, self.args.liger_kernel_config)
            enable_packed_forward(ref_model, ref_backend or self.args.attn_backend, reference=True)
            if self.args.ref_cuda_graphs and graphs_here:
                from .modeling.graphs import enable_reference_graphs

                enable_reference_graphs(ref_model)
        self._prefix_installed = True

    def _cuda_graphs_apply(self) -> bool:
        """Whether ``*_cuda_graphs`` can apply here: one process or DDP (FSDP and DeepSpeed gather weights in hooks,
        which a graph cannot replay)."""
        from accelerate.utils import DistributedType

        if not (self.args.ref_cuda_graphs or self.args.policy_cuda_graphs):
            return False
        if self.accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU):
            return True
        logger.warning("ref_cuda_graphs / policy_cuda_graphs are not used under %s (weights are gathered on the fly); "
                       "the models run without CUDA graphs", self.accelerator.distributed_type.value)
        return False

    def _unwrapped(self, model):
        """The module TRL's calls reach: accelerate's wrappers removed, and torch.compile's ``OptimizedModule``
        (``torch_compile``), which routes every call to the module it holds. Regional compilation's outer copy is not
        an ``OptimizedModule``: it is the module called, so it stays (``keep_torch_compile=False`` would return the
        original behind it, which no call reaches)."""
        from accelerate.utils import is_compiled_module

        model = self.accelerator.unwrap_model(model)
        return model._orig_mod if is_compiled_module(model) else model

    def _packed_policy(self):
        model = self._unwrapped(self.model) if hasattr(self, "accelerator") else self.model
        return model.get_base_model() if is_peft_model(model) else model

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Called from TRL's __init__: reference log-probs are precomputed through the same packed path. Without a
        # reference model TRL runs the policy itself (full fine-tuning: its initial weights; PEFT: adapters off):
        # those calls are reference calls (``ref_attn_backend``).
        # TRL caches them in a file keyed on the dataset and the model's weights; FP8 attention gives other values,
        # so its settings join the key (switching ref_attn_backend must not reuse the other setting's file).
        self._install_prefix_packing()
        model_hash = self._precompute_model_hash
        if self.args.ref_attn_backend == "triton_fp8":
            from datasets.fingerprint import Hasher

            self._precompute_model_hash = Hasher.hash((model_hash, "triton_fp8", self.args.fp8_rotation))
        try:
            with reference_mode(self._packed_policy()) if self.ref_model is None else contextlib.nullcontext():
                return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self._precompute_model_hash = model_hash

    # ------------------------------------------------------------------ loss and metrics
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        stats = inputs[PACKED_KEY]["stats"]
        counts = [stats["packed_tokens"], stats["unshared_tokens"], stats["padded_tokens"], stats["pairs"],
                  stats["shared_pairs"], stats["sequences"], stats["branches"]]
        rows = 1
        if self.accelerator.num_processes > 1:
            gathered = self.accelerator.gather_for_metrics(
                torch.tensor(counts, dtype=torch.float64, device=self.accelerator.device)[None])
            counts, rows = gathered.sum(0).tolist(), gathered.shape[0]
        # One process: the counts are host integers already; a device round trip would add a host-GPU sync to a
        # step that is host bound on short pairs (scripts/profile_step.py --breakdown lists the syncs).
        packed, unshared, padded, pairs, shared, sequences, branches = counts
        saved, deduplicated = sharing_fractions(packed, unshared, sequences, branches)
        self._metrics[mode]["prefix_sharing/tokens_saved_frac"].append(saved)
        self._metrics[mode]["prefix_sharing/responses_deduplicated_frac"].append(deduplicated)
        self._metrics[mode]["prefix_sharing/shared_pairs_frac"].append(shared / pairs)
        # The padding TRL's batch of the same pairs would have had (packed rows have none).
        self._metrics[mode]["packing/trl_padding_frac"].append(1.0 - unshared / padded)
        if self.args.batching == "token_budget":
            self._metrics[mode]["batching/pairs_per_micro_batch"].append(pairs / rows)
            self._metrics[mode]["batching/row_fill"].append(packed / (rows * self.args.max_tokens_per_batch))
        if mode == "train":
            self._throughput["pairs"] += pairs
            self._throughput["tokens"] += packed
        if self.args.batching == "token_budget" and self.accelerator.num_processes > 1:
            # TRL gathers per-pair tensors (rewards, logps) with accelerator.gather, which needs equal sizes on every
            # process; token-budget micro-batches hold different numbers of pairs. Gather them ragged instead.
            self.accelerator.gather = functools.partial(_gather_ragged, self.accelerator.gather)
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                del self.accelerator.gather
        return super()._compute_loss(model, inputs, return_outputs)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.args.batching == "token_budget":
            # Every process calls this once per optimizer step, before its micro-batches run: count the step's pairs.
            local = sum(b[PACKED_KEY]["stats"]["pairs"] for b in batch_samples)
            total = self.accelerator.gather(torch.tensor([local], dtype=torch.long, device=self.accelerator.device))
            self._step_pairs = int(total.sum().item())
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.args.batching == "token_budget" and self.model.training and self._step_pairs:
            # s_m = n_m * G_p * W / N (class docstring): after training_step's division by G_p and the all-reduce's
            # mean over W, each pair of the step weighs 1/N.
            pairs = inputs[PACKED_KEY]["stats"]["pairs"]
            scale = pairs * self.current_gradient_accumulation_steps * self.accelerator.num_processes / self._step_pairs
            out = (out[0] * scale, *out[1:]) if return_outputs else out * scale
        return out

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        loss, logits, labels = super().prediction_step(model, inputs, True, ignore_keys)
        if self._eval_pair_weight is not None and loss is not None:
            # Trainer's evaluation_loop repeats every micro-batch's loss by the same count (eval_batch_size), so
            # eval_loss is a plain mean over micro-batches; n_m * M / N turns it into the mean over pairs.
            num_batches, num_pairs = self._eval_pair_weight
            loss = loss * (inputs[PACKED_KEY]["stats"]["pairs"] * num_batches / num_pairs)
        return loss, logits, labels

    def evaluation_loop(self, dataloader, *args, **kwargs):
        sampler = getattr(dataloader, "batch_sampler", None)
        while sampler is not None and not isinstance(sampler, TokenBudgetBatchSampler):
            sampler = getattr(sampler, "batch_sampler", None)  # accelerate's shard / skip wrappers
        self._eval_pair_weight = (len(sampler), len(sampler.lengths)) if sampler is not None else None
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self._eval_pair_weight = None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self.model.training and "loss" in logs:
            now = time.perf_counter()
            t0 = self._throughput["time"]
            if t0 is not None and now > t0:
                logs["throughput/pairs_per_second"] = self._throughput["pairs"] / (now - t0)
                logs["throughput/tokens_per_second"] = self._throughput["tokens"] / (now - t0)
            self._throughput.update(pairs=0, tokens=0, time=now)
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, with three guarantees: a fresh run never writes into an ``output_dir`` holding a previous
        one (unless ``overwrite_output_dir``); ``resume_from_checkpoint=True`` (or ``args.resume_from_checkpoint``)
        resumes from the newest complete checkpoint; the first SIGTERM/SIGINT saves a checkpoint after the current
        step and returns (``stop_on_signal.stopped_at`` then holds the step)."""
        if resume_from_checkpoint is None:
            resume_from_checkpoint = self.args.resume_from_checkpoint
        if isinstance(resume_from_checkpoint, str) and resume_from_checkpoint.strip().lower() in ("true", "false"):
            resume_from_checkpoint = resume_from_checkpoint.strip().lower() == "true"
        checkpoints.check_start(self.args.output_dir, resume_from_checkpoint, self.args.overwrite_output_dir)
        resume = checkpoints.resolve_resume(resume_from_checkpoint, self.args.output_dir)
        self._throughput.update(pairs=0, tokens=0, time=time.perf_counter())
        self.stop_on_signal.install()
        try:
            out = super().train(resume, *args, **kwargs)
        finally:
            self.stop_on_signal.uninstall()
        if self.stop_on_signal.stopped_at is not None:
            self.accelerator.print(
                f"Stopped by {self.stop_on_signal.stopped_by} after step {self.stop_on_signal.stopped_at}; checkpoint "
                f"saved in {os.path.join(self.args.output_dir, f'checkpoint-{self.stop_on_signal.stopped_at}')}. "
                "To continue, run the same command with resume_from_checkpoint true."
            )
        return out

    def save_merged_model(self, output_dir: str | None = None) -> str:
        """Save the base model with the trained adapters merged in (safetensors, config, tokenizer), by default to
        ``<output_dir>/merged``; returns the directory. Call it on every process after ``save_model``: the main process
        merges on the CPU from the adapter just saved in ``args.output_dir`` and the base model its config names (so
        it works alike under DDP, FSDP and ZeRO-3, whose shards need no gathering, and for a quantized base, which is
        loaded unquantized); a base built in memory, with no path, is merged from a CPU copy of the model instead."""
        from peft import AutoPeftModelForCausalLM

        target = output_dir or os.path.join(self.args.output_dir, "merged")
        model = self._unwrapped(self.model)
        base_path = getattr(model.peft_config[model.active_adapter], "base_model_name_or_path", None)
        if self.args.should_save:
            staged = checkpoints.staging_dir(target)
            checkpoints.clear_staging(staged)
            if base_path and os.path.exists(os.path.join(self.args.output_dir, "adapter_config.json")):
                peft_model = AutoPeftModelForCausalLM.from_pretrained(self.args.output_dir, dtype="auto",
                                                                      device_map={"": "cpu"})
            else:
                peft_model = copy.deepcopy(model).to("cpu")
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(staged, safe_serialization=True)
            self.processing_class.save_pretrained(staged)
            checkpoints.publish_files(staged, target)
            logger.info("merged model saved to %s", target)
        self.accelerator.wait_for_everyone()
        return target

    # ------------------------------------------------------------------ staged saves
    def _save_checkpoint(self, model, trial):
        """Write the checkpoint into a hidden staging folder beside ``checkpoint-<step>``, flush it, rename it into
        place (checkpoints.py); every process writes its part into the same staging folder first."""
        run_dir = super()._get_output_dir(trial)
        final = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        staged_root = checkpoints.staging_dir(final)
        if self.args.should_save:
            checkpoints.clear_staging(staged_root)
        self.accelerator.wait_for_everyone()
        self._staging_root = staged_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        staged = os.path.join(staged_root, os.path.basename(final))
        if self.args.should_save and self.state.best_model_checkpoint == staged:
            self.state.best_model_checkpoint = final
            self.state.save_to_json(os.path.join(staged, checkpoints.TRAINER_STATE))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            checkpoints.publish_checkpoint(staged, final)
            os.rmdir(staged_root)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial):
        # Inside _save_checkpoint: the staging folder stands in for the run directory.
        staged = getattr(self, "_staging_root", None)
        return staged if staged is not None else super()._get_output_dir(trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """``Trainer.save_model``; a save outside a checkpoint (the final model) is staged in a hidden folder, flushed,
        and moved into ``output_dir`` with its config last, so a model directory with a config has its weights."""
        if _internal_call:
            return super().save_model(output_dir, _internal_call=True)
        target = output_dir or self.args.output_dir
        staged = checkpoints.staging_dir(os.path.join(target, "model"))
        if self.args.should_save:
            checkpoints.clear_staging(staged)
        self.accelerator.wait_for_everyone()
        super().save_model(staged, _internal_call=False)
        self.accelerator.wait_for_everyone()
        if self.args.should_save and os.path.isdir(staged):
            checkpoints.publish_files(staged, target)
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ prompt grouping (group_by_prompt)
    @property
    def _data_seed(self) -> int:
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def _dataset_cached(self, what: str, dataset, build):
        key = (what, getattr(dataset, "_fingerprint", None) or id(dataset))
        if key not in self._data_cache:
            self._data_cache[key] = build(dataset)
        return self._data_cache[key]

    def _prompt_groups_if_grouping(self, dataset) -> list[list[int]] | None:
        """The dataset's pairs per prompt when micro-batches keep them together (``group_by_prompt``), else None."""
        if self.args.group_by_prompt == "never":
            return None
        groups = self._dataset_cached("groups", dataset, vision_prompt_groups if self._vision else prompt_groups)
        grouping = use_prompt_groups(self.args.group_by_prompt, groups, self.args.train_sampling_strategy)
        return groups if grouping else None

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        groups = self._prompt_groups_if_grouping(dataset) if has_length(dataset) else None
        if groups is None:
            return super()._get_train_sampler(train_dataset)
        self._train_pair_sampler = PromptGroupedSampler(groups, self._train_batch_size, seed=self._data_seed)
        return self._train_pair_sampler

    def _get_eval_sampler(self, eval_dataset):
        groups = self._prompt_groups_if_grouping(eval_dataset) if has_length(eval_dataset) else None
        if groups is None:
            return super()._get_eval_sampler(eval_dataset)
        return PromptGroupedSampler(groups, self.args.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ token-budget dataloaders
    def get_train_dataloader(self) -> DataLoader:
        if self.args.batching != "token_budget":
            return super().get_train_dataloader()
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        return self._token_budget_dataloader(self.train_dataset, "Training", training=True)

    def get_eval_dataloader(self, eval_dataset=None) -> DataLoader:
        if self.args.batching != "token_budget":
            return super().get_eval_dataloader(eval_dataset)
        if eval_dataset is None and self.eval_dataset is None:
            raise ValueError("Trainer: evaluation requires an eval_dataset.")
        if isinstance(eval_dataset, str):
            eval_dataset = self.eval_dataset[eval_dataset]
        elif eval_dataset is None:
            eval_dataset = self.eval_dataset
        return self._token_budget_dataloader(eval_dataset, "Evaluation", training=False)

    def _run_epoch(self, *args, **kwargs):
        # Trainer sets the epoch on the dataloader it iterates; after a resume's skip_first_batches under DDP that
        # wrapper chain no longer reaches our batch sampler. Set it here, before the epoch's iterator exists.
        for sampler in (self._train_batch_sampler, self._train_pair_sampler):
            if sampler is not None:
                sampler.set_epoch(kwargs["epoch"] if "epoch" in kwargs else args[1])
        return super()._run_epoch(*args, **kwargs)

    def _pair_shapes(self, dataset):
        """The packed shape of every pair (``packing.pair_shapes``); an image dataset is measured first, with one
        processor run per pair (``vision.measure_vision_pairs``)."""
        args = self.args
        if not self._vision:
            return dataset_pair_shapes(dataset, args.max_length, args.truncation_mode, args.prefix_sharing)
        pairs = measure_vision_pairs(dataset, self.processing_class)
        return [pair_shapes(p, args.max_length, "keep_start", args.prefix_sharing) for p in pairs]

    def _token_budget_dataloader(self, dataset, description: str, training: bool) -> DataLoader:
        """A dataloader over ``TokenBudgetBatchSampler`` micro-batches, prepared by accelerate (which deals whole
        micro-batches round-robin to the processes under DDP/FSDP/ZeRO)."""
        import datasets

        args = self.args
        if isinstance(dataset, (IterableDataset, datasets.IterableDataset)) or not hasattr(dataset, "__len__"):
            raise ValueError("batching='token_budget' needs a dataset with a length (not an IterableDataset)")
        collator = self.data_collator
        if isinstance(dataset, datasets.Dataset):
            dataset = self._remove_unused_columns(dataset, description=description)
        else:
            collator = self._get_collator_with_removed_columns(collator, description=description)
        shapes = self._dataset_cached("shapes", dataset, self._pair_shapes)
        lengths = self._dataset_cached("lengths", dataset, lambda d: packed_lengths(shapes))
        groups = self._prompt_groups_if_grouping(dataset)
        make_sampler = partial(TokenBudgetBatchSampler, lengths, args.max_tokens_per_batch, seed=self._data_seed,
                               groups=groups, shapes=shapes if groups is not None else None)
        num_epochs = 1
        if training:
            # The sampler's length must hold for every epoch the run iterates (batching.py says why): bound them.
            if args.max_steps > 0:
                first = len(make_sampler(num_epochs=1))
                per_process = math.ceil(first / self.accelerator.num_processes)
                steps_per_epoch = max(1, math.ceil(per_process / args.gradient_accumulation_steps))
                num_epochs = math.ceil(args.max_steps / steps_per_epoch)  # more micro-batches only mean fewer epochs
            else:
                num_epochs = math.ceil(args.num_train_epochs)
        sampler = make_sampler(shuffle=training, num_epochs=num_epochs)
        params = {
            "batch_sampler": sampler,
            "collate_fn": collator,
            "num_workers": args.dataloader_num_workers,
            "pin_memory": args.dataloader_pin_memory,
            "persistent_workers": args.dataloader_persistent_workers,
            "multiprocessing_context": args.dataloader_multiprocessing_context,
            "prefetch_factor": args.dataloader_prefetch_factor,
            "in_order": args.dataloader_in_order,
        }
        if training:
            params["worker_init_fn"] = partial(seed_worker, num_workers=args.dataloader_num_workers,
                                               rank=args.process_index)
            self._train_batch_sampler = sampler
        return self.accelerator.prepare(DataLoader(dataset, **params))
