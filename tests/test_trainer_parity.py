"""Step-for-step parity with trl.DPOTrainer (TRL 1.16), float32 on the CPU: same pairs in the same steps, and the same
loss, rewards/*, logps/* and weights, for every loss type and option TRL's DPOConfig accepts.

The runs use plain SGD. With Adam, both trainers agree on the first step to float32 rounding, but Adam divides each
gradient by its own running RMS, so parameters whose gradient is near rounding level get updates that differ by up
to the learning rate between *any* two float32 evaluation orders (measured: weights 1e-3..1e-2 apart after 3 steps,
TRL vs ours, while SGD keeps them 1e-8 apart). That is a property of the optimizer, not of the trainers.

Pairs whose chosen and rejected are identical are left out here (their reward comparison is decided by rounding);
the exactness tests cover them.
"""

import copy
import os

import pytest
import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from conftest import FAMILIES, make_pairs, make_tokenizer, tiny_model
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

COMPARED = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
            "logps/rejected", "logits/chosen", "logits/rejected", "entropy", "num_tokens", "mean_token_accuracy")
RTOL = 1e-4


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", bf16=False, per_device_train_batch_size=4,
                per_device_eval_batch_size=4, max_steps=3, logging_steps=1, learning_rate=0.5, optim="sgd",
                gradient_checkpointing=False, seed=0, save_strategy="no", max_length=40, disable_tqdm=True)
    base.update(kw)
    return cls(**base)


def run(trainer_cls, config_cls, tmp_path, data, model=None, ref="copy", eval_data=None, peft_config=None, **kw):
    model = model if model is not None else tiny_model("llama", seed=0)
    ref_model = copy.deepcopy(model) if ref == "copy" else None
    trainer = trainer_cls(model=model, ref_model=ref_model, args=_args(config_cls, tmp_path, **kw),
                          train_dataset=Dataset.from_list(data),
                          eval_dataset=Dataset.from_list(eval_data) if eval_data else None,
                          processing_class=make_tokenizer(), peft_config=peft_config)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return trainer, logs


def assert_same_logs(a, b, keys=COMPARED, beta=0.1):
    """Relative RTOL on each value. A reward is beta * (logp - ref_logp), a difference of two nearly equal sums, so its
    error is relative to the sums it is taken from: its tolerance is RTOL * beta * |logps| (cancellation)."""
    assert len(a) == len(b) > 0
    for step, (x, y) in enumerate(zip(a, b)):
        logp_scale = max(abs(x.get("logps/chosen", 0.0)), abs(x.get("logps/rejected", 0.0)))
        for k in keys:
            if k in x:
                atol = RTOL * beta * logp_scale if k.startswith("rewards/") and k != "rewards/accuracies" else 1e-6
                assert y[k] == pytest.approx(x[k], rel=RTOL, abs=atol), f"step {step}: {k}: TRL {x[k]} vs ours {y[k]}"


def assert_same_weights(m1, m2):
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        assert torch.allclose(p1, p2, rtol=RTOL, atol=1e-6), n1


DATA = make_pairs(16, seed=3, prompt=(1, 14), response=(0, 8))

LOSS_CASES = [
    dict(loss_type=[t]) for t in ["sigmoid", "hinge", "ipo", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
] + [
    dict(loss_type=["exo_pair"], label_smoothing=1e-3),
    dict(loss_type=["robust"], label_smoothing=0.1),
    dict(loss_type=["sigmoid", "sft", "bco_pair"], loss_weights=[0.8, 0.2, 1.0]),  # MPO-style mixture
    dict(loss_type=["sigmoid"], f_divergence_type="forward_kl"),
    dict(loss_type=["sigmoid"], f_divergence_type="js_divergence"),
    dict(loss_type=["hinge"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["sigmoid"], use_weighting=True),
    dict(loss_type=["sigmoid"], ld_alpha=0.5),
    dict(loss_type=["sigmoid"], max_length=12),  # truncation cuts responses
    dict(loss_type=["sigmoid"], gradient_checkpointing=True),  # TRL's default
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_loss_parity_with_trl(case, tmp_path):
    t_trl, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, **case)
    t_ours, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, **case)
    assert_same_logs(logs_trl, logs_ours)
    assert_same_weights(t_trl.model, t_ours.model)
    assert logs_ours[-1]["logps/chosen"] != logs_ours[0]["logps/chosen"]  # the steps moved the model
    if case.get("gradient_checkpointing"):
        # TRL checkpoints non-reentrantly, ours reentrantly by default (PrefixDPOConfig): same training.
        layer = t_ours.model.model.layers[0]
        assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is True
        assert t_trl.model.model.layers[0]._gradient_checkpointing_func.keywords["use_reentrant"] is False


def test_gradient_accumulation_weights_pairs_as_trl(tmp_path):
    kw = dict(per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=2)
    t_trl, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, **kw)
    t_ours, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, **kw)
    assert_same_logs(logs_trl, logs_ours)
    assert_same_weights(t_trl.model, t_ours.model)


def test_evaluation_parity(tmp_path):
    eval_data = make_pairs(8, seed=9)
    t_trl, _ = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, eval_data=eval_data, max_steps=2)
    t_ours, _ = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, eval_data=eval_data, max_steps=2)
    m_trl, m_ours = t_trl.evaluate(), t_ours.evaluate()
    for k in ("eval_loss", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/accuracies"):
        assert m_ours[k] == pytest.approx(m_trl[k], rel=RTOL, abs=1e-6), k


def test_precomputed_reference_parity(tmp_path):
    kw = dict(precompute_ref_log_probs=True)
    t_trl, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, ref=None, **kw)
    t_ours, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, ref=None, **kw)
    # At the first step policy == reference, so every reward is 0 up to rounding and the accuracy is decided by it.
    keys = tuple(k for k in COMPARED if k != "rewards/accuracies")
    assert_same_logs(logs_trl, logs_ours, keys=keys)
    assert_same_logs(logs_trl[1:], logs_ours[1:])
    assert "ref_chosen_logps" in t_ours.train_dataset.column_names


def test_sync_ref_model_parity(tmp_path):
    kw = dict(sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=0.5, max_steps=3)
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, **kw)
    _, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, **kw)
    assert_same_logs(logs_trl, logs_ours)


@pytest.mark.parametrize("gc", [False, True], ids=["no-checkpointing", "checkpointing"])
def test_peft_lora_parity(tmp_path, gc):
    from peft import LoraConfig

    # With checkpointing: ours is reentrant (PrefixDPOConfig's default), which trains the adapter only because the
    # layers' input is made to require grad (the embedding is frozen under LoRA); TRL's is non-reentrant.
    lora = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, ref=None, peft_config=LoraConfig(**lora),
                      gradient_checkpointing=gc)
    _, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, ref=None,
                       peft_config=LoraConfig(**lora), gradient_checkpointing=gc)
    assert_same_logs(logs_trl, logs_ours)
    assert logs_ours[-1]["rewards/margins"] != 0.0  # the adapter trained, and the reference (adapter off) did not move


def test_in_memory_model_without_ref_model_gets_a_frozen_copy(tmp_path):
    # TRL would reload the reference from the policy's hub path, which a model built from a config lacks.
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, ref="copy")
    t_ours, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, ref=None)
    assert_same_logs(logs_trl, logs_ours)
    assert t_ours.ref_model is not None and not any(p.requires_grad for p in t_ours.ref_model.parameters())


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2)
    _, full = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "full", DATA, **kw)
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "model.safetensors").exists()
    model = tiny_model("llama", seed=0)
    trainer = PrefixDPOTrainer(model=model, ref_model=copy.deepcopy(model),
                               args=_args(PrefixDPOConfig, tmp_path / "resumed", **kw),
                               train_dataset=Dataset.from_list(DATA), processing_class=make_tokenizer())
    trainer.train(resume_from_checkpoint=str(ckpt))
    resumed = [h for h in trainer.state.log_history if "loss" in h and h["step"] > 2]
    assert [h["step"] for h in resumed] == [3, 4]
    assert_same_logs(full[2:], resumed, keys=("loss", "rewards/margins", "logps/chosen", "logps/rejected"))


def test_metrics_report_sharing_and_throughput(tmp_path):
    _, logs = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path, DATA, max_steps=2)
    last = logs[-1]
    assert 0.0 < last["prefix_sharing/tokens_saved_frac"] < 1.0
    assert "packing/padding_frac" not in last and last["packing/trl_padding_frac"] > 0.0
    assert last["throughput/pairs_per_second"] > 0 and last["throughput/tokens_per_second"] > 0


def test_unsupported_options_are_refused_clearly(tmp_path):
    with pytest.raises(ValueError, match="compute_metrics"):
        PrefixDPOTrainer(model=tiny_model(), args=_args(PrefixDPOConfig, tmp_path),
                         train_dataset=Dataset.from_list(DATA), processing_class=make_tokenizer(),
                         compute_metrics=lambda p: {})
    with pytest.raises(ValueError, match="attn_backend"):
        _args(PrefixDPOConfig, tmp_path, attn_backend="fast")


def test_bf16_autocast_matches_trl_to_bf16_precision(tmp_path):
    # Mixed precision (TRL's default bf16=True; on the CPU with use_cpu=True). Under autocast the projections leave
    # q/k/v in mixed dtypes; the attention function casts them as SDPA would. Tolerance: bf16's unit roundoff 2^-8.
    kw = dict(bf16=True, use_cpu=True, max_steps=2)
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, **kw)
    _, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, **kw)
    for x, y in zip(logs_trl, logs_ours):
        for k in ("loss", "logps/chosen", "logps/rejected"):
            assert y[k] == pytest.approx(x[k], rel=2**-8), k


@pytest.mark.parametrize("regional", [False, True], ids=["whole", "regional"])
def test_torch_compile_installs_into_the_compiled_model(tmp_path, monkeypatch, regional):
    # torch_compile wraps the model in torch's OptimizedModule before training starts; the packed forward goes into
    # the module inside it. Regional compilation instead makes an outer copy whose layers are compiled: that copy
    # is the module called (the reference among them: were it left unpacked, its log-probs would round otherwise
    # and the logged rewards differ). Dynamo's eager backend traces as inductor does without compiling kernels.
    if regional:
        monkeypatch.setenv("ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION", "1")
    kw = dict(torch_compile=True, torch_compile_backend="eager", max_steps=2)
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, **kw)
    _, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, **kw)
    assert_same_logs(logs_trl, logs_ours)


@pytest.mark.slow  # ~3 min of inductor compilation on 2 CPU cores: run with `pytest -m slow`
def test_torch_compile_parity(tmp_path):
    kw = dict(torch_compile=True, max_steps=2)
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", DATA, **kw)
    _, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", DATA, **kw)
    assert_same_logs(logs_trl, logs_ours)


def test_report_to_tensorboard_writes_our_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path, DATA, max_steps=2, report_to="tensorboard")
    runs = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if "tfevents" in f]
    assert runs
    acc = EventAccumulator(os.path.dirname(runs[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/rewards/margins", "train/prefix_sharing/tokens_saved_frac"} <= tags


def test_checkpointing_kind_defaults(tmp_path, monkeypatch):
    kw = dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    assert PrefixDPOConfig(**kw).gradient_checkpointing_kwargs == {"use_reentrant": True}  # ours
    assert PrefixDPOConfig(**kw, gradient_checkpointing_kwargs={"use_reentrant": False}).gradient_checkpointing_kwargs \
        == {"use_reentrant": False}  # the user's choice wins
    assert PrefixDPOConfig(**kw, gradient_checkpointing=False).gradient_checkpointing_kwargs is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # under FSDP: TRL's (non-reentrant) kind, the one verified there
    assert PrefixDPOConfig(**kw).gradient_checkpointing_kwargs is None


@pytest.mark.parametrize("arch", FAMILIES)
def test_model_family_parity(arch, tmp_path):
    # Sliding windows that bite (prompts and responses of up to 22 words against windows of 4-6 positions), Gemma 2's
    # soft-capping, gpt-oss's sinks (and its MoE router's aux loss, which TRL adds to the loss).
    data = make_pairs(16, seed=5, prompt=(4, 14), response=(1, 8))
    t_trl, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", data, model=tiny_model(arch, seed=0))
    t_ours, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", data, model=tiny_model(arch, seed=0))
    assert_same_logs(logs_trl, logs_ours, keys=COMPARED + ("aux_loss",))
    assert_same_weights(t_trl.model, t_ours.model)
