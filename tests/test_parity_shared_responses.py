"""Step-for-step parity with trl.DPOTrainer (TRL 1.16) on data whose prompts and responses recur within micro-batches,
for every loss type TRL has: the packed row runs each prompt and each distinct response of a micro-batch once, and
TRL's loss, metrics and gradients follow, float32 on the CPU.

Both trainers are fed the same micro-batches: ``train_sampling_strategy="sequential"`` (TRL's own order, which
``group_by_prompt="auto"`` leaves alone) over data laid out prompt by prompt, so each micro-batch of 4 holds pairs of
one or two prompts that share responses; and, in the last test, our grouped order given to TRL's trainer too.

The runs use plain SGD, as tests/test_trainer_parity.py does. Pairs that share responses pull on them in opposite
directions (pair (r0, r1) pushes r1 down, pair (r1, r2) pushes it up), so many gradient components end up near zero;
Adam divides each component by its own running RMS, turning float32 rounding of near-zero components into steps of the
full learning rate (measured on such data: weights 1e-4 apart after 3 AdamW steps, 1e-10 with SGD). SGD keeps every
update proportional to its gradient, so the comparison below is a statement about the gradients.

The tolerance (``rounding_tolerance``) is derived, not chosen: the two trainers compute the same real-valued function
in different float32 orders (packed against padded attention, one branch read by several pairs against one sequence
per pair). A chain of n dependent float32 roundings carries a relative error of at most lambda * sqrt(n) * u with
probability at least 1 - 2 exp(-lambda^2 / 2) when the rounding errors are independent and of mean zero (Higham and
Mary, SIAM J. Sci. Comput. 41(5), 2019, Theorem 2.4; u = 2^-24); two evaluations differ by at most twice that. n is
counted from the model's shapes: the longest chain from the weights through one step's forward, backward and update
(``rounding_chain``), times the steps run. lambda = 8 (failure probability 2e-14 per chain). Each compared value is then
held to that relative tolerance with respect to the magnitude of the terms it is computed from, which the test
measures: for log-probs (sums of terms of one sign) their own magnitude; for rewards (beta times policy minus reference
log-probs) beta times the sum of the two magnitudes; for the loss the first-order sensitivity of TRL's loss to a
relative error in every per-token log-prob (recorded by autograd, ``TRLWithLossSensitivity``); for a weight tensor
the largest sum of steps any of its elements took (plus one rounding of the weight per step). The weights' scale is
per tensor, not per element: a gradient element sums terms from every token, and where pairs that share a response
pull it both ways the terms cancel to a small step while its rounding stays that of the terms.
"""

import copy
import inspect
import math
import re

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from conftest import make_all_pairs, make_tokenizer, tiny_model
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer
from prefixdpo.data.grouping import PromptGroupedSampler, prompt_groups

U = 2.0**-24  # float32 unit roundoff
LAMBDA = 8.0
STEPS, BATCH, MAX_LENGTH = 3, 4, 40

# Every loss type TRL 1.16's _compute_loss implements, read from its code (so a TRL with more is tested on them).
LOSS_TYPES = re.findall(r'loss_type == "(\w+)"', inspect.getsource(DPOTrainer._compute_loss))
LOSS_OPTIONS = {"exo_pair": dict(label_smoothing=1e-3)}  # its loss takes log(label_smoothing)

# 3 prompts x every pair of 4 responses, prompt by prompt: micro-batches of 4 hold 1-2 prompts and share responses.
DATA = make_all_pairs(prompts=3, responses=4, seed=1, prompt=(6, 20), response=(2, 8))


def rounding_chain(config, max_length: int, pairs: int) -> int:
    """Dependent float32 roundings from the weights to one SGD update, counted per accumulation (a sum of k terms is
    k roundings deep): per decoder layer the input norm (hidden), q/k/v (hidden), scores (head dim), softmax and the
    value sum (one per key, up to max_length), o_proj (hidden), the residual, the second norm, gate/up (hidden), down
    (intermediate), the residual; then the final norm, the LM head (hidden), the log-softmax (vocabulary), the sum
    over a sequence (max_length) and the mean over the 2 * pairs sequences. The backward runs the same chain
    transposed, and each weight gradient sums over every token of the step; the update is one more rounding."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    d = getattr(config, "head_dim", None) or h // config.num_attention_heads
    layer = h + h + d + 2 * max_length + h + 1 + h + h + i + 1
    forward = config.num_hidden_layers * layer + h + h + v + max_length + 2 * pairs
    backward = forward + 2 * pairs * max_length
    return forward + backward + 1


def rounding_tolerance(config, steps: int = STEPS, max_length: int = MAX_LENGTH, pairs: int = BATCH) -> float:
    n = steps * rounding_chain(config, max_length, pairs)
    return 2 * LAMBDA * math.sqrt(n) * U


class TRLWithLossSensitivity(DPOTrainer):
    """TRL's trainer, recording for each micro-batch how far a relative error tau in every per-token log-prob, of the
    policy and of the reference, can move TRL's loss, to first order: tau * sum_t |dloss/dlogp_t| * |logp_t| for the
    policy, and as much again for the reference (it enters the log-ratios with the opposite sign)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_sensitivity = []

    def _compute_loss(self, model, inputs, return_outputs):
        outputs = []
        hook = model.register_forward_hook(lambda module, args, out: outputs.append(out))
        try:
            loss = super()._compute_loss(model, inputs, return_outputs)
        finally:
            hook.remove()
        if model.training:
            logps = outputs[0].log_probs
            (grad,) = torch.autograd.grad(loss, logps, retain_graph=True)
            self.loss_sensitivity.append(2 * (grad.abs() * logps.detach().abs()).sum().item())
        return loss


class TRLGrouped(TRLWithLossSensitivity):
    """The same, drawing the micro-batches PrefixDPOTrainer's group_by_prompt draws (same sampler, same seed)."""

    def _get_train_sampler(self, train_dataset=None):
        return PromptGroupedSampler(prompt_groups(self.train_dataset), self._train_batch_size, seed=self.args.seed)


class WeightPath(TrainerCallback):
    """Sum over the steps of each weight's change, |w_s - w_(s-1)| (with SGD: the step's lr * |gradient|)."""

    def __init__(self, model):
        self.last = [p.detach().clone() for p in model.parameters()]
        self.path = [torch.zeros_like(p) for p in self.last]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for last, path, p in zip(self.last, self.path, model.parameters()):
            path += (p.detach() - last).abs()
            last.copy_(p.detach())


def run(trainer_cls, config_cls, tmp_path, **kw):
    model = tiny_model("llama", seed=0)
    base = dict(output_dir=str(tmp_path), report_to="none", bf16=False, per_device_train_batch_size=BATCH,
                max_steps=STEPS, logging_steps=1, learning_rate=0.5, optim="sgd", gradient_checkpointing=False, seed=0,
                save_strategy="no", max_length=MAX_LENGTH, disable_tqdm=True, train_sampling_strategy="sequential")
    path = WeightPath(model)
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=config_cls(**{**base, **kw}),
                          train_dataset=Dataset.from_list(DATA), processing_class=make_tokenizer(), callbacks=[path])
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h], path.path


def assert_parity(trl, ours, tau, beta=0.1):
    """``trl`` and ``ours``: (trainer, logs, weight paths) of ``run``; tolerances as the module docstring derives."""
    (t_trl, logs_trl, path), (t_ours, logs_ours, _) = trl, ours
    assert len(logs_trl) == len(logs_ours) == STEPS
    micro = len(t_trl.loss_sensitivity) // STEPS  # micro-batches per step; the logged loss is their mean
    for step, (x, y) in enumerate(zip(logs_trl, logs_ours)):
        sensitivity = sum(t_trl.loss_sensitivity[step * micro : (step + 1) * micro]) / micro
        scale = {"loss": abs(x["loss"]) + sensitivity}
        for side in ("chosen", "rejected"):
            logp = abs(x[f"logps/{side}"])
            scale[f"logps/{side}"] = logp
            scale[f"rewards/{side}"] = beta * (logp + abs(x[f"logps/{side}"] - x[f"rewards/{side}"] / beta))
        scale["rewards/margins"] = scale["rewards/chosen"] + scale["rewards/rejected"]
        for key, s in scale.items():
            assert abs(y[key] - x[key]) <= tau * s, f"step {step}: {key}: TRL {x[key]} vs ours {y[key]} (tol {tau * s})"
        # Counts and a comparison of rewards that are apart by far more than rounding: equal.
        for key in ("num_tokens", "rewards/accuracies"):
            assert y[key] == x[key], f"step {step}: {key}"
    for (name, p), (_, q), walked in zip(t_trl.model.named_parameters(), t_ours.model.named_parameters(), path):
        bound = tau * walked.max().item() + STEPS * U * p.detach().abs().max().item()
        assert (p - q).abs().max().item() <= bound, f"{name}: {(p - q).abs().max().item()} > {bound}"
    assert logs_ours[-1]["logps/chosen"] != logs_ours[0]["logps/chosen"]  # the steps moved the model
    assert min(h["prefix_sharing/responses_deduplicated_frac"] for h in logs_ours) > 0  # responses were shared


def test_the_tolerance_and_the_data():
    tau = rounding_tolerance(tiny_model("llama").config)
    assert 1e-5 < tau < 1e-4  # ~6e3 roundings deep: tau = 2 * 8 * sqrt(n) * u
    assert set(LOSS_TYPES) >= {"sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_trl_with_shared_responses(loss_type, tmp_path):
    kw = dict(loss_type=[loss_type], **LOSS_OPTIONS.get(loss_type, {}))
    trl = run(TRLWithLossSensitivity, DPOConfig, tmp_path / "trl", **kw)
    ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", **kw)
    assert ours[0]._train_pair_sampler is None  # TRL's sequential order: the same micro-batches
    assert_parity(trl, ours, rounding_tolerance(ours[0].model.config))


OPTION_CASES = [
    dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    dict(loss_type=["hinge"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[0.8, 0.2, 1.0]),
    dict(loss_type=["sigmoid"], use_weighting=True),
    dict(loss_type=["sigmoid"], ld_alpha=0.5),
    dict(loss_type=["sigmoid"], max_length=16),  # keep_start cuts responses: the cut ones still share
    dict(loss_type=["sigmoid"], max_length=16, truncation_mode="keep_end"),  # prompts cut by the response's length
    dict(loss_type=["ipo"], per_device_train_batch_size=2, gradient_accumulation_steps=2),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_options_match_trl_with_shared_responses(case, tmp_path):
    trl = run(TRLWithLossSensitivity, DPOConfig, tmp_path / "trl", **case)
    ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", **case)
    max_length = case.get("max_length", MAX_LENGTH)
    pairs = case.get("per_device_train_batch_size", BATCH) * case.get("gradient_accumulation_steps", 1)
    assert_parity(trl, ours, rounding_tolerance(ours[0].model.config, max_length=max_length, pairs=pairs))


@pytest.mark.parametrize("loss_type", ["sigmoid", "aot"])
def test_grouped_order_matches_trl_given_the_same_micro_batches(loss_type, tmp_path):
    # Ours groups by prompt (auto: the data repeats prompts) and reshuffles; TRL draws from the same sampler.
    kw = dict(loss_type=[loss_type], train_sampling_strategy="random")
    trl = run(TRLGrouped, DPOConfig, tmp_path / "trl", **kw)
    ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", **kw)
    assert isinstance(ours[0]._train_pair_sampler, PromptGroupedSampler)
    assert_parity(trl, ours, rounding_tolerance(ours[0].model.config))
