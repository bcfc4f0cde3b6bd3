"""``use_liger_kernel=True``: Liger-Kernel's layer kernels (RMSNorm, RoPE, SwiGLU) in the policy and the reference.

transformers' Trainer applies them to the policy when training starts; PrefixDPOTrainer applies them to a separate
reference model too. Liger's kernels need a GPU (its RMSNorm does not run in Triton's CPU interpreter), so here the
apply function is replaced by a recorder; tests/gpu/test_model_gpu.py runs the real kernels against the unpatched
model.
"""

import copy

import transformers.integrations.liger as hf_liger
import transformers.trainer as hf_trainer
from datasets import Dataset

from conftest import make_pairs, make_tokenizer, tiny_model
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer


def test_liger_is_applied_to_the_policy_and_the_reference_without_the_fused_loss(tmp_path, monkeypatch):
    calls = []

    def record(model, config):
        calls.append((model, dict(config or {})))

    monkeypatch.setattr(hf_liger, "apply_liger_kernel", record)
    monkeypatch.setattr(hf_trainer, "apply_liger_kernel", record)
    monkeypatch.setattr(hf_trainer, "is_liger_kernel_available", lambda *a, **k: True, raising=False)
    model = tiny_model("llama", seed=0)
    ref = copy.deepcopy(model)
    args = PrefixDPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, per_device_train_batch_size=4,
                           max_steps=1, use_liger_kernel=True, save_strategy="no", disable_tqdm=True)
    trainer = PrefixDPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(make_pairs(8)),
                               processing_class=make_tokenizer())
    trainer.train()
    patched = [m for m, _ in calls]
    assert any(m is ref for m in patched), "the reference model did not get Liger's kernels"
    assert any(m is model for m in patched), "the policy did not get Liger's kernels"
    # The fused linear cross-entropy would replace the forward that scores the packed rows: never applied.
    assert all(cfg.get("fused_linear_cross_entropy") is False for _, cfg in calls)
