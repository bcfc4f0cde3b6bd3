"""PrefixDPOConfig: TRL's DPOConfig plus the fields prefix sharing adds. Every TRL field keeps its meaning and default."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import DPOConfig

from .data.ranked import RULES as PAIRS_FROM_RANKS

ATTN_BACKENDS = ("auto", "triton", "fa4", "sdpa", "flex", "reference")
# The reference model runs forward only, so it may also use the FP8 forward (prefix_attn's `triton_fp8`).
REF_ATTN_BACKENDS = ATTN_BACKENDS + ("triton_fp8",)
BATCHING_MODES = ("pairs", "token_budget")
BAD_ROWS = ("drop", "error")
_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0", "", "none", "null")
GROUP_BY_PROMPT = ("auto", "always", "never")


def uses_fsdp(args) -> bool:
    """Whether this run trains under FSDP: launched by accelerate with an FSDP config, or ``fsdp`` set in the args."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" or bool(getattr(args, "fsdp", None))


@dataclass
class PrefixDPOConfig(DPOConfig):
    """Configuration for :class:`~prefixdpo.PrefixDPOTrainer`.

    Everything of :class:`trl.DPOConfig` applies unchanged, with one default changed: with gradient checkpointing on
    and ``gradient_checkpointing_kwargs`` not given, checkpointing is reentrant (``{"use_reentrant": True}``; TRL and
    transformers 5 default to the non-reentrant kind). Both recompute the same forward in the backward and give the
    same gradients; the reentrant kind runs the first forward without autograd, so it records no graph and calls no
    saved-tensor hooks. On short pairs, where a step is bound by host time, that made the HH-RLHF shape 1.15x faster
    (docs/PERFORMANCE.md). Pass ``gradient_checkpointing_kwargs={"use_reentrant": False}`` to keep TRL's. Under FSDP
    TRL's kind stays: the FSDP2 runs were verified with it, and reentrant recomputation inside FSDP2's
    hooks was not. The fields below are new; each is checked once in ``__post_init__``.
    """

    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "Put each pair into one sequence: the prompt once, then the chosen and the rejected response, "
            "which cannot see each other. Exact (same log-probs as running the prompt twice) and faster. Set False "
            "to pack each response with its own copy of the prompt (for comparison)."
        },
    )
    attn_backend: str = field(
        default="auto",
        metadata={
            "help": "Attention backend for the packed rows: 'auto' (triton on a CUDA GPU where it runs, else flex on "
            "CUDA, else reference), 'triton' (our kernels), 'fa4' (FlashAttention-4 on a per-branch decomposition; "
            "pip install \"prefixdpo[fa4]\"), 'sdpa' (torch's dense SDPA kernels on the same decomposition, one call "
            "per sequence; auto's choice for rows of long prefixes), 'flex' (FlexAttention, the prefix-sharing "
            "paper's method), "
            "'reference' (dense-mask SDPA: CPU, tests, tiny models).",
            "choices": list(ATTN_BACKENDS),
        },
    )
    ref_attn_backend: str | None = field(
        default=None,
        metadata={
            "help": "Attention backend for the reference model's forward (it needs no backward). None: the same as "
            "`attn_backend`. 'triton_fp8': FP8 (e4m3) attention, Q/K/V quantized per tile with fp32 scales, softmax "
            "in fp32 (Hopper; elsewhere it falls back to the bf16 triton kernel with a warning). Trades a small, "
            "measured error in the reference log-probs (docs/PERFORMANCE.md) for a faster reference forward. Applies "
            "to a separate reference model, to the PEFT policy with its adapter disabled, and to "
            "`precompute_ref_log_probs`.",
            "choices": [None, *REF_ATTN_BACKENDS],
        },
    )
    fp8_rotation: bool = field(
        default=True,
        metadata={
            "help": "With ref_attn_backend='triton_fp8': rotate Q and K by a random orthogonal (Hadamard times random "
            "signs) matrix before quantizing, as FlashAttention-3 does. QK^T is unchanged; outlier channels are "
            "spread over all channels, which lowers the FP8 error. Costs one small matmul per tile in the quantize "
            "step."
        },
    )
    ref_cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "Run a separate reference model's backbone as CUDA graphs, one per row length rounded up to 256 "
            "tokens (rows padded with one document that attends only to itself), for rows of up to 4096 tokens with "
            "the triton backend; other rows run as before. For short pairs, where a step waits on the host: the "
            "reference forward then costs one launch instead of hundreds. Costs GPU memory for the graphs' buffers "
            "(about one reference forward's activations at the largest length seen)."
        },
    )
    policy_cuda_graphs: bool = field(
        default=False,
        metadata={
            "help": "With gradient checkpointing on: run the policy's decoder stack in the forward as CUDA graphs, one "
            "per row length rounded up to 256 tokens (rows of up to 4096 tokens, triton backend); the backward "
            "recomputes each layer eagerly under autograd, as reentrant checkpointing does, so gradients are those of "
            "checkpointing. For short pairs, where a step waits on the host: the policy's forward then costs one launch "
            "instead of hundreds. Not with dropout or quantized weights (a warning says so, training runs as before). "
            "Costs GPU memory: one buffer of every layer's input at 4096 tokens and the graphs' pool."
        },
    )
    batching: str = field(
        default="pairs",
        metadata={
            "help": "How micro-batches are formed. 'pairs' (default, TRL's semantics): `per_device_train_batch_size` "
            "pairs per micro-batch, the same pairs per step as TRL, packed into one row. 'token_budget': each "
            "micro-batch is filled with pairs of similar packed length up to `max_tokens_per_batch` packed tokens "
            "(`per_device_*_batch_size` is then not used); the loss is weighted so every pair of an optimizer step "
            "counts equally, as with a fixed number of pairs.",
            "choices": list(BATCHING_MODES),
        },
    )
    max_tokens_per_batch: int | None = field(
        default=None,
        metadata={
            "help": "Token budget of one packed micro-batch row (prompt once + both responses per pair, after "
            "truncation) when `batching='token_budget'` (required there, >= max_length). A pair packs to at most "
            "2 * max_length tokens; one longer than the budget is refused when the dataloader is built. Trades memory "
            "for throughput: larger rows keep the GPU fuller."
        },
    )

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let a fresh run write into an output_dir that holds a previous run (a saved model or checkpoint-* "
            "folders). Without it such a run is refused before anything loads, and nothing in the directory changes; "
            "to continue the previous run instead, set resume_from_checkpoint."
        },
    )
    on_bad_rows: str = field(
        default="drop",
        metadata={
            "help": "Dataset rows that cannot train (a null value, wrong types, malformed messages) or carry no "
            "preference (chosen == rejected): 'drop' them with a warning that counts them per reason, or 'error' at "
            "the first one. Rows with an empty prompt or response train as TRL trains them.",
            "choices": list(BAD_ROWS),
        },
    )

    chat_template_path: str | None = field(
        default=None,
        metadata={
            "help": "A chat template for the tokenizer, instead of (or for a tokenizer without) its own: the path of a "
            "Jinja file (.jinja, .j2) or the template itself as a string. Applied before the data is tokenized, and "
            "saved with the model. (TRL's SFT name; axolotl's `chat_template`, LLaMA-Factory's `template`.)"
        },
    )
    merge_adapters: bool = field(
        default=False,
        metadata={
            "help": "At the end of a LoRA (PEFT) run, also save the base model with the trained adapters merged into "
            "it (safetensors, config, tokenizer) in <output_dir>/merged. Done by the main process alone, on the CPU, "
            "from the saved adapter and the base model it names (a quantized base is loaded unquantized for this)."
        },
    )
    group_by_prompt: str = field(
        default="auto",
        metadata={
            "help": "Keep the pairs of one prompt (equal tokenized prompt) together in a micro-batch, so the packed "
            "row runs the prompt once for all of them and each response they share once; with batching='pairs' the "
            "pairs per micro-batch and per step stay TRL's, a prompt with more pairs than a micro-batch holds is "
            "split. The order is reshuffled every epoch from the seed (resume-safe, the same on every process). "
            "'auto' (default): group when some prompt of the dataset has several pairs and train_sampling_strategy "
            "is 'random', so a dataset without repeated prompts keeps exactly TRL's order; 'always'; 'never': TRL's "
            "order (pairs of one prompt then share only when they land in one micro-batch by chance). Exact either "
            "way: the loss is per pair (aot and sft excepted, which depend on a micro-batch's makeup).",
            "choices": list(GROUP_BY_PROMPT),
        },
    )
    pairs_from_ranks: str = field(
        default="best_vs_rest",
        metadata={
            "help": "How a dataset of ranked or scored completions per prompt (openbmb/UltraFeedback's "
            "instruction + completions[].overall_score, Nectar's prompt + answers[].rank) becomes pairs: "
            "'best_vs_rest' (the best completion against each other one), 'all' (every two completions, the better "
            "one chosen), 'best_vs_worst' (one pair per prompt). Two completions of equal score or rank make no pair; "
            "they are counted and reported. Not used for datasets that already have chosen/rejected "
            "(prefixdpo.data.ranked).",
            "choices": list(PAIRS_FROM_RANKS),
        },
    )

    def __post_init__(self):
        # resume_from_checkpoint is a string field in TrainingArguments; on the command line "true" means "the newest
        # complete checkpoint in output_dir", as YAML's true does.
        resume = self.resume_from_checkpoint
        if isinstance(resume, str) and resume.strip().lower() in _TRUE:
            self.resume_from_checkpoint = True
        elif isinstance(resume, str) and resume.strip().lower() in _FALSE or resume is False:
            self.resume_from_checkpoint = None
        super().__post_init__()
        if self.gradient_checkpointing and self.gradient_checkpointing_kwargs is None and not uses_fsdp(self):
            # The one changed default (class docstring). transformers >= 5.2x names the field
            # activation_checkpointing_kwargs and keeps the old name as a mirror of it: set both.
            self.gradient_checkpointing_kwargs = {"use_reentrant": True}
            if hasattr(self, "activation_checkpointing_kwargs"):
                self.activation_checkpointing_kwargs = self.gradient_checkpointing_kwargs
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}")
        if self.ref_attn_backend is not None and self.ref_attn_backend not in REF_ATTN_BACKENDS:
            raise ValueError(f"ref_attn_backend must be None or one of {REF_ATTN_BACKENDS}, got {self.ref_attn_backend!r}")
        if self.on_bad_rows not in BAD_ROWS:
            raise ValueError(f"on_bad_rows must be one of {BAD_ROWS}, got {self.on_bad_rows!r}")
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {BATCHING_MODES}, got {self.batching!r}")
        if self.group_by_prompt not in GROUP_BY_PROMPT:
            raise ValueError(f"group_by_prompt must be one of {GROUP_BY_PROMPT}, got {self.group_by_prompt!r}")
        if self.group_by_prompt == "always" and self.train_sampling_strategy != "random":
            raise ValueError(
                f"group_by_prompt='always' orders the pairs itself; it cannot also follow train_sampling_strategy="
                f"{self.train_sampling_strategy!r}. Use one of them ('auto' keeps the sampling strategy)."
            )
        if self.pairs_from_ranks not in PAIRS_FROM_RANKS:
            raise ValueError(f"pairs_from_ranks must be one of {PAIRS_FROM_RANKS}, got {self.pairs_from_ranks!r}")
        if self.batching == "token_budget":
            if self.max_tokens_per_batch is None or self.max_tokens_per_batch < 2:
                raise ValueError(
                    "batching='token_budget' needs max_tokens_per_batch set to the packed tokens one micro-batch row "
                    f"may hold (>= 2), got {self.max_tokens_per_batch!r}"
                )
            if self.max_length is not None and self.max_tokens_per_batch < self.max_length:
                raise ValueError(
                    f"max_tokens_per_batch ({self.max_tokens_per_batch}) must be at least max_length "
                    f"({self.max_length}), or the longest pair might not fit one micro-batch"
                )
        elif self.max_tokens_per_batch is not None:
            raise ValueError(
                "max_tokens_per_batch is only used with batching='token_budget'; set batching='token_budget' or unset it"
            )
