"""Image preference data (prefixdpo.data.vision): parity with trl.DPOTrainer step for step, exactness of each pair's
log-probs against the pair run alone, multi-axis positions, image sharing rules, token budgets and refusals, for tiny
LLaVA, Qwen2.5-VL and Idefics3 models and processors built offline (tests/vision_fixtures.py)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForVisionPreference
from trl.trainer.utils import add_fused_lm_head

from test_trainer_parity import COMPARED, assert_same_logs, assert_same_weights
from vision_fixtures import FAMILIES, make_image_pairs, make_processor, make_vision_model, random_image
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer
from prefixdpo.data.collator import PACKED_KEY
from prefixdpo.data.vision import VisionPackingCollator, image_statistics, measure_vision_pairs
from prefixdpo.modeling.attention import UnsupportedModelError
from prefixdpo.modeling.packed import enable_packed_forward

# Prompts with 1 or 2 images, every 4th without one, every 3rd repeating the previous prompt and images (shared
# documents in a micro-batch), every 5th repeating the previous prompt text with other images of the same size.
DATA = make_image_pairs(12, seed=1, images=(1, 2), text_only_every=4, repeat_prompt_every=3,
                        same_tokens_other_image_every=5)


def _args(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, per_device_train_batch_size=4,
                max_steps=3, logging_steps=1, learning_rate=0.5, optim="sgd", gradient_checkpointing=False, seed=0,
                save_strategy="no", max_length=None, disable_tqdm=True)
    if cls is PrefixDPOConfig:
        base["group_by_prompt"] = "never"  # TRL's order of pairs, so the micro-batches are TRL's
    base.update(kw)
    return cls(**base)


def run(trainer_cls, config_cls, tmp_path, family, data=DATA, **kw):
    processor = make_processor(family)
    model = make_vision_model(family, processor)
    trainer = trainer_cls(model=model, ref_model=copy.deepcopy(model), args=_args(config_cls, tmp_path, **kw),
                          train_dataset=Dataset.from_list(data), processing_class=processor)
    trainer.train()
    return trainer, [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_with_trl_on_image_pairs(family, tmp_path):
    # Same tolerances as the text parity tests (test_trainer_parity: float32 rounding of the per-token log-probs summed
    # over a response, and the cancellation in a reward), and the same pairs per step.
    t_trl, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", family)
    t_ours, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", family)
    assert_same_logs(logs_trl, logs_ours, keys=COMPARED)
    assert_same_weights(t_trl.model, t_ours.model)
    assert logs_ours[-1]["logps/chosen"] != logs_ours[0]["logps/chosen"]
    assert all(h["prefix_sharing/tokens_saved_frac"] > 0.2 for h in logs_ours)
    # The vision tower kept its own attention; the language model ran prefix_attn.
    config = t_ours.model.config
    assert config.get_text_config()._attn_implementation == "prefix_attn"
    assert config.vision_config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava"])
def test_parity_with_trl_without_prefix_sharing_and_truncated(family, tmp_path):
    # prefix_sharing=False: each sequence a document with its own images, as TRL; max_length cuts some responses.
    kw = dict(max_length=20, max_steps=2)
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", family, **kw)
    _, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", family, prefix_sharing=False, **kw)
    assert_same_logs(logs_trl, logs_ours)
    assert all(h["prefix_sharing/shared_pairs_frac"] == 0 for h in logs_ours)


def test_parity_with_trl_under_gradient_checkpointing(tmp_path):
    # TRL's default: checkpointing (ours reentrant, TRL's non-reentrant), the vision tower checkpointed too.
    _, logs_trl = run(DPOTrainer, DPOConfig, tmp_path / "trl", "qwen2_5_vl", gradient_checkpointing=True, max_steps=2)
    _, logs_ours = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path / "ours", "qwen2_5_vl", gradient_checkpointing=True,
                       max_steps=2)
    assert_same_logs(logs_trl, logs_ours)


def _alone_logps(model, pair, processor):
    """A pair's (chosen, rejected) log-probs by TRL's vision collator on the pair alone and the unpatched model."""
    batch = DataCollatorForVisionPreference(processor=processor)([copy.deepcopy(pair)])
    mask = batch.pop("completion_mask")
    logits = model(**batch, use_cache=False).logits[:, :-1].float()
    lp = torch.log_softmax(logits, -1).gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    return (lp * mask[:, 1:]).sum(1)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logps_and_grads_equal_each_pair_alone(family):
    processor = make_processor(family)
    model = make_vision_model(family, processor, seed=2)
    pairs = DATA[:8]
    batch = VisionPackingCollator(processor)(copy.deepcopy(pairs))
    packed = copy.deepcopy(model)
    add_fused_lm_head(packed, outputs=("log_probs",))
    enable_packed_forward(packed, "reference")
    kwargs = {k: v for k, v in batch.items() if k != "completion_mask"}
    got = packed(**kwargs, fused_lm_head=True).log_probs.sum(1)
    alone = [_alone_logps(model, p, processor) for p in pairs]
    want = torch.cat([torch.stack([a[0] for a in alone]), torch.stack([a[1] for a in alone])])
    # float32, the row against padded single-pair batches (other matmul shapes, other summation orders): each per-token
    # log-prob (~4 nats, ulp 4.8e-7) to a few ulps, so a response's sum of <= 20 of them (|sum| <= 31) to
    # 20 * 4 * 4.8e-7 ~ 4e-5 at worst; rtol 1e-5 of the sum plus atol 1e-5 holds that. Measured: at most 5.7e-6 (3 ulps
    # of the sum).
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # Gradients of a loss over the whole row equal the sum over the pairs run alone.
    params = dict(packed.named_parameters())
    g_packed = torch.autograd.grad(got.sum(), list(params.values()), allow_unused=True)
    total = sum(a.sum() for a in alone)
    g_alone = torch.autograd.grad(total, [dict(model.named_parameters())[n] for n in params], allow_unused=True)
    # Per parameter to 1e-4 relative, above a floor of float32 rounding of the whole gradient (a key bias has an
    # exactly zero gradient, softmax being shift-invariant: both sides are rounding noise there).
    scale = torch.cat([b.flatten() for b in g_alone if b is not None]).norm()
    for name, a, b in zip(params, g_packed, g_alone):
        if b is None:
            assert a is None or a.abs().max() == 0, name
            continue
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-6 * scale, name
    stats = batch[PACKED_KEY]["stats"]
    assert stats["images"] < stats["unshared_images"] and stats["image_tokens"] < stats["unshared_image_tokens"]


def test_view_is_trls_vision_collator(tmp_path):
    processor = make_processor("qwen2_5_vl")
    for max_length in (None, 14):
        ours = VisionPackingCollator(processor, max_length=max_length)(copy.deepcopy(DATA[:8]))
        trl = DataCollatorForVisionPreference(processor=processor, max_length=max_length)(copy.deepcopy(DATA[:8]))
        assert torch.equal(ours["attention_mask"], trl["attention_mask"])
        assert torch.equal(ours["completion_mask"], trl["completion_mask"])
        mask = trl["attention_mask"].bool()
        assert torch.equal(ours["input_ids"][mask], trl["input_ids"][mask])
        assert "pixel_values" not in ours  # the images travel once, inside the packed row


def test_equal_prompt_tokens_with_other_images_do_not_share():
    processor = make_processor("llava")
    base = make_image_pairs(1, seed=4, images=(1, 1))[0]
    img = base["images"][0]
    other = {**base, "images": [random_image(__import__("random").Random(9), img.size)]}
    same = {**base, "images": [img.copy()]}
    collate = VisionPackingCollator(processor)
    # Equal tokens and pixels: one document, the image once. Equal tokens, other pixels: two documents, two images.
    for second, docs in ((same, 1), (other, 2)):
        packed = collate([copy.deepcopy(base), copy.deepcopy(second)])[PACKED_KEY]
        assert len(packed["layout"]["prefix_lens"]) == docs
        assert packed["model_inputs"]["pixel_values"].shape[0] == docs
        assert packed["stats"]["images"] == docs and packed["stats"]["unshared_images"] == 4


def test_multi_axis_positions_are_the_rope_index_of_each_sequence():
    # Qwen2.5-VL: each sequence's positions in the packed row are what the model's rope index gives TRL's sequence
    # prompt + response (image tokens on (t, h, w), text continuing after the image's largest position).
    from prefixdpo.modeling.packed import _position_ids
    from prefix_attn import PrefixLayout

    processor = make_processor("qwen2_5_vl")
    model = make_vision_model("qwen2_5_vl", processor)
    pairs = DATA[:8]
    packed = VisionPackingCollator(processor)(copy.deepcopy(pairs))[PACKED_KEY]
    layout = PrefixLayout.from_dict(packed["layout"])
    pos = _position_ids(model, packed, layout)[:, 0]
    assert pos.shape[0] == 3 and not torch.equal(pos[0], pos[1])  # image tokens make the axes differ
    trl = DataCollatorForVisionPreference(processor=processor)(copy.deepcopy(pairs))
    want, _ = model.model.get_rope_index(trl["input_ids"], mm_token_type_ids=trl["mm_token_type_ids"],
                                         image_grid_thw=trl["image_grid_thw"], attention_mask=trl["attention_mask"])
    # The rows read by each sequence (src -> dst): the positions of the tokens that predict its response, and the
    # view's positions of the same tokens, must agree.
    width = trl["input_ids"].shape[1] - 1
    src, dst = packed["src"], packed["dst"]
    seq, at = dst // width, dst % width
    assert torch.equal(pos[:, src], want[:, seq, at])


def test_token_budget_counts_image_tokens(tmp_path):
    processor = make_processor("idefics3")
    measured = measure_vision_pairs(Dataset.from_list(DATA), processor)
    collate = VisionPackingCollator(processor)
    for pair, row in zip(measured, DATA):
        packed = collate([copy.deepcopy(row)])[PACKED_KEY]
        assert len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"]) + 1 == \
            packed["stats"]["packed_tokens"]
        assert pair["image_tokens"] == packed["stats"]["image_tokens"]
    trainer, logs = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path, "idefics3", batching="token_budget",
                        max_tokens_per_batch=64, max_steps=3)
    assert logs and all(h["batching/row_fill"] <= 1.0 for h in logs)
    stats = image_statistics(measured, [list(range(4)), list(range(4, 12))])
    assert stats["image_tokens_packed"] < stats["image_tokens_trl"] and stats["images_packed"] < stats["images_trl"]


def test_group_by_prompt_keeps_image_prompts_together(tmp_path):
    trainer, logs = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path, "llava", group_by_prompt="always", max_steps=2)
    assert logs
    from prefixdpo.data.vision import vision_prompt_groups

    groups = vision_prompt_groups(Dataset.from_list(DATA))
    assert sum(len(g) for g in groups) == len(DATA) and any(len(g) > 1 for g in groups)
    assert all(DATA[g[0]]["prompt"] == DATA[i]["prompt"] for g in groups for i in g)


class _Untouchable(list):
    """A dataset whose rows must not be read."""

    column_names = ["images", "prompt", "chosen", "rejected"]

    def __getitem__(self, i):
        raise AssertionError("the data was read")

    def __iter__(self):
        raise AssertionError("the data was read")


def test_gemma3_refused_before_data_is_touched(tmp_path):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(
        text_config={"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "sliding_window": 64},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                       "image_size": 28, "patch_size": 14},
        mm_tokens_per_image=4,
    )
    model = Gemma3ForConditionalGeneration(cfg)
    with pytest.raises(UnsupportedModelError, match="images.*both directions"):
        PrefixDPOTrainer(model=model, args=_args(PrefixDPOConfig, tmp_path), train_dataset=_Untouchable(),
                         processing_class=make_processor("llava"))


def test_unsupported_vision_setups_refused_in_one_line(tmp_path):
    from conftest import make_tokenizer, tiny_model

    with pytest.raises(UnsupportedModelError, match="images with a llama model"):
        PrefixDPOTrainer(model=tiny_model(), args=_args(PrefixDPOConfig, tmp_path), train_dataset=_Untouchable(),
                         processing_class=make_tokenizer())
    processor = make_processor("llava")
    with pytest.raises(UnsupportedModelError, match="images need the model's processor"):
        PrefixDPOTrainer(model=make_vision_model("llava", processor), args=_args(PrefixDPOConfig, tmp_path),
                         train_dataset=_Untouchable(), processing_class=processor.tokenizer)
    with pytest.raises(ValueError, match="images: ref_cuda_graphs"):
        PrefixDPOTrainer(model=make_vision_model("llava", processor),
                         args=_args(PrefixDPOConfig, tmp_path, ref_cuda_graphs=True), train_dataset=_Untouchable(),
                         processing_class=processor)


def test_dpo_loss_over_alone_matches(tmp_path):
    # The loss TRL computes from the alone log-probs is the one logged by ours at the first step (policy == reference:
    # ln 2), a sanity check that the view's sequence order (chosen block, then rejected) is TRL's.
    _, logs = run(PrefixDPOTrainer, PrefixDPOConfig, tmp_path, "qwen2_5_vl", max_steps=1)
    assert logs[0]["loss"] == pytest.approx(-F.logsigmoid(torch.tensor(0.0)).item(), abs=1e-6)


def test_data_stats_count_image_tokens_as_the_trainer_packs_them(tmp_path):
    from prefixdpo.data.vision import vision_training_statistics

    processor = make_processor("qwen2_5_vl")
    args = _args(PrefixDPOConfig, tmp_path, group_by_prompt="always")
    stats = vision_training_statistics(Dataset.from_list(DATA), processor, args)
    assert stats["pairs"] == len(DATA)
    assert 0 < stats["image_tokens_packed"] < stats["image_tokens_trl"] <= stats["tokens_trl"]
    assert stats["images_packed"] < stats["images_trl"] == 2 * sum(len(r["images"]) for r in DATA)
    # The packed-token forecast is the collator's count for the same micro-batches.
    from prefixdpo.data.grouping import training_micro_batches
    from prefixdpo.data.vision import vision_prompt_groups

    batches = training_micro_batches(measure_vision_pairs(DATA, processor), args,
                                     groups=vision_prompt_groups(Dataset.from_list(DATA)))
    collate = VisionPackingCollator(processor)
    packed = [collate([copy.deepcopy(DATA[i]) for i in b])[PACKED_KEY]["stats"] for b in batches]
    assert stats["tokens_packed"] == sum(p["packed_tokens"] for p in packed)
    assert stats["image_tokens_packed"] == sum(p["image_tokens"] for p in packed)


def test_data_stats_command_reports_image_tokens(tmp_path, capsys):
    # An image dataset saved with save_to_disk and a model directory holding the processor: data-stats measures every
    # pair with the processor and prints what sharing saves on image tokens.
    from prefixdpo.cli import main

    processor = make_processor("llava")
    model_dir = tmp_path / "model"
    processor.save_pretrained(model_dir)
    make_vision_model("llava", processor).save_pretrained(model_dir)
    data_dir = tmp_path / "images"
    Dataset.from_list(DATA).save_to_disk(str(data_dir))
    assert main(["data-stats", "--dataset_name", str(data_dir), "--model_name_or_path", str(model_dir),
                 "--output_dir", str(tmp_path / "out"), "--group_by_prompt", "always", "--use_cpu", "true",
                 "--bf16", "false"]) == 0
    out = capsys.readouterr().out
    assert "image tokens, TRL / packed:" in out and "images through the vision tower" in out
