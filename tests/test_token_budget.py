"""batching="token_budget": micro-batches filled up to a packed-token budget, pairs grouped by length.

The sampler: every micro-batch within the budget (counted as the collator packs it), every pair once per epoch, a fixed
count across epochs, grouping that narrows the lengths in a micro-batch, determinism per (seed, epoch). The trainer:
one SGD step over accumulated micro-batches of different pair counts equals one step over the same pairs in one
micro-batch of the default "pairs" mode (every pair weighs 1/N), eval_loss is the per-pair mean, and resume continues
the same run.
"""

import copy
import random
import statistics

import pytest
import torch
from datasets import Dataset

from conftest import make_pairs, make_tokenizer, tiny_model
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer
from prefixdpo.data.batching import TokenBudgetBatchSampler, batch_token_counts
from prefixdpo.data.collator import PACKED_KEY, PrefixPackingCollator
from prefixdpo.data.packing import pack_pairs, packed_pair_length


def _tokenized(n, seed=0, prompt=(1, 30), response=(0, 20), identical_every=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = [rng.randrange(4, 100) for _ in range(rng.randint(*prompt))]
        c = [rng.randrange(4, 100) for _ in range(rng.randint(*response))] + [3]
        r = c if identical_every and i % identical_every == 0 else [rng.randrange(4, 100) for _ in
                                                                     range(rng.randint(*response))] + [3]
        out.append({"prompt_ids": p, "chosen_ids": c, "rejected_ids": r})
    return out


@pytest.mark.parametrize("max_length,mode,sharing", [(None, "keep_start", True), (24, "keep_start", True),
                                                     (24, "keep_end", True), (24, "keep_start", False),
                                                     (8, "keep_end", True)])
def test_packed_pair_length_counts_what_pack_pairs_packs(max_length, mode, sharing):
    for ex in _tokenized(200, seed=1):
        want = len(pack_pairs([ex], max_length, mode, sharing).input_ids)
        assert packed_pair_length(ex, max_length, mode, sharing) == want
        assert want <= 2 * (max_length or 10**9)


def test_every_micro_batch_within_budget_and_every_pair_once():
    data = _tokenized(300, seed=2)
    max_length, budget = 32, 256
    lengths = [packed_pair_length(ex, max_length) for ex in data]
    sampler = TokenBudgetBatchSampler(lengths, budget, seed=0, num_epochs=3)
    collator = PrefixPackingCollator(pad_token_id=0, max_length=max_length)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert sorted(i for b in batches for i in b) == list(range(len(data)))  # each pair exactly once
        for b in batches:
            packed = collator([data[i] for i in b])[PACKED_KEY]["stats"]["packed_tokens"]
            assert packed == sum(lengths[i] for i in b) <= budget
    fill = sum(lengths) / (len(sampler) * budget)
    assert fill > 0.85, fill  # grouped greedy filling keeps rows nearly full


def test_grouping_narrows_lengths_within_a_micro_batch():
    lengths = [packed_pair_length(ex) for ex in _tokenized(2000, seed=3, prompt=(1, 200), response=(0, 100))]
    budget = 2048
    sampler = TokenBudgetBatchSampler(lengths, budget, seed=0)
    grouped = [statistics.pstdev(lengths[i] for i in b) for b in sampler if len(b) > 1]
    # The same greedy fill over a random order (chunk of one pair: no sorting).
    random_order = TokenBudgetBatchSampler(lengths, budget, seed=0, chunk_size=1)
    ungrouped = [statistics.pstdev(lengths[i] for i in b) for b in random_order if len(b) > 1]
    assert statistics.mean(grouped) < 0.25 * statistics.mean(ungrouped)
    # Sorting does not buy fill (greedy in random order fills about as well); it buys uniform rows.
    assert len(sampler) <= 1.02 * len(random_order)


def test_deterministic_per_seed_different_across_epochs_and_seeds():
    lengths = [packed_pair_length(ex) for ex in _tokenized(500, seed=4)]
    a = TokenBudgetBatchSampler(lengths, 200, seed=7, num_epochs=2)
    b = TokenBudgetBatchSampler(lengths, 200, seed=7, num_epochs=2)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    a.set_epoch(0)
    assert list(a) != list(b)
    assert list(TokenBudgetBatchSampler(lengths, 200, seed=8)) != list(TokenBudgetBatchSampler(lengths, 200, seed=7))
    # Evaluation: no shuffle, one deterministic batching.
    e = TokenBudgetBatchSampler(lengths, 200, shuffle=False)
    e.set_epoch(5)
    assert list(e) == list(TokenBudgetBatchSampler(lengths, 200, shuffle=False))


def test_the_count_is_fixed_over_the_run_and_a_pair_over_budget_is_refused():
    lengths = [packed_pair_length(ex) for ex in _tokenized(400, seed=5)]
    counts = [len(TokenBudgetBatchSampler(lengths, 150, seed=0, num_epochs=1).batches(e)) for e in range(6)]
    s = TokenBudgetBatchSampler(lengths, 150, seed=0, num_epochs=6)
    assert len(s) == max(len(s._greedy(e)) for e in range(6)) >= max(counts)
    for e in range(6):
        batches = s.batches(e)
        assert len(batches) == len(s) and max(batch_token_counts(batches, lengths)) <= 150
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        TokenBudgetBatchSampler(lengths, max(lengths) - 1)


def test_config_checks(tmp_path):
    def cfg(**kw):
        return PrefixDPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **kw)

    assert cfg(batching="token_budget", max_tokens_per_batch=2048, max_length=1024).batching == "token_budget"
    assert cfg().batching == "pairs" and cfg().max_tokens_per_batch is None
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        cfg(batching="token_budget")
    with pytest.raises(ValueError, match="max_tokens_per_batch"):
        cfg(batching="token_budget", max_tokens_per_batch=1, max_length=None)
    with pytest.raises(ValueError, match="at least max_length"):
        cfg(batching="token_budget", max_tokens_per_batch=512, max_length=1024)
    with pytest.raises(ValueError, match="only used with"):
        cfg(max_tokens_per_batch=512)
    with pytest.raises(ValueError, match="batching must be"):
        cfg(batching="tokens")


# ---------------------------------------------------------------------------------------------------- the trainer
DATA = make_pairs(12, seed=3, prompt=(1, 14), response=(0, 8))
EVAL = make_pairs(10, seed=9, prompt=(1, 14), response=(0, 8))
BUDGET = 80  # 2 * max_length: every pair fits alone; ~3-4 pairs per row here


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to="none", bf16=False, max_steps=1, logging_steps=1,
                learning_rate=0.5, optim="sgd", gradient_checkpointing=False, seed=0, save_strategy="no",
                max_length=40, disable_tqdm=True, per_device_eval_batch_size=len(EVAL))
    base.update(kw)
    return PrefixDPOConfig(**base)


def _trainer(tmp_path, data=DATA, eval_data=None, ref_seed=None, **kw):
    model = tiny_model("llama", seed=0)
    ref = copy.deepcopy(model) if ref_seed is None else tiny_model("llama", seed=ref_seed)
    return PrefixDPOTrainer(model=model, ref_model=ref, args=_args(tmp_path, **kw),
                            train_dataset=Dataset.from_list(data),
                            eval_dataset=Dataset.from_list(eval_data) if eval_data else None,
                            processing_class=make_tokenizer())


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_one_step_over_budget_micro_batches_equals_one_step_over_all_pairs(loss_type, tmp_path):
    # "pairs": all 12 pairs in one micro-batch, one step. "token_budget": the same 12 pairs in several micro-batches
    # of different pair counts, accumulated into one step (gradient_accumulation_steps above the micro-batch count).
    ref = _trainer(tmp_path / "pairs", per_device_train_batch_size=len(DATA), loss_type=[loss_type])
    ref.train()
    ours = _trainer(tmp_path / "budget", batching="token_budget", max_tokens_per_batch=BUDGET,
                    gradient_accumulation_steps=64, loss_type=[loss_type])
    ours.train()
    batches = ours._train_batch_sampler.batches(0)
    assert len(batches) >= 3 and len({len(b) for b in batches}) > 1, batches
    assert sorted(i for b in batches for i in b) == list(range(len(DATA)))
    assert ours.state.global_step == 1
    for (name, p1), (_, p2) in zip(ref.model.named_parameters(), ours.model.named_parameters()):
        assert torch.allclose(p1, p2, rtol=1e-5, atol=1e-7), name
    moved = any(not torch.equal(p, q) for p, q in zip(ours.model.parameters(), tiny_model("llama").parameters()))
    assert moved
    log_ref = next(h for h in ref.state.log_history if "loss" in h)
    log_ours = next(h for h in ours.state.log_history if "loss" in h)
    assert log_ours["loss"] == pytest.approx(log_ref["loss"], rel=1e-5)  # the logged loss is the per-pair mean too
    assert 1.0 < log_ours["batching/pairs_per_micro_batch"] < len(DATA)
    assert 0.5 < log_ours["batching/row_fill"] <= 1.0
    assert "batching/row_fill" not in log_ref


def test_eval_loss_is_the_per_pair_mean(tmp_path):
    # A reference unlike the policy, so the pairs' losses differ (with policy == reference every one is log 2).
    ref = _trainer(tmp_path / "pairs", eval_data=EVAL, ref_seed=1)
    ours = _trainer(tmp_path / "budget", eval_data=EVAL, ref_seed=1, batching="token_budget",
                    max_tokens_per_batch=BUDGET)
    assert len({len(b) for b in ours.get_eval_dataloader().batch_sampler}) > 1
    m_ref, m_ours = ref.evaluate(), ours.evaluate()
    assert m_ours["eval_loss"] == pytest.approx(m_ref["eval_loss"], rel=1e-5)
    assert 0.5 < m_ours["eval_batching/row_fill"] <= 1.0


def test_resume_continues_the_same_run(tmp_path):
    # 12 pairs in ~4-5 micro-batches, 2 per step: the run crosses into epoch 1, and is resumed inside it.
    kw = dict(batching="token_budget", max_tokens_per_batch=BUDGET, gradient_accumulation_steps=2, max_steps=5,
              save_strategy="steps", save_steps=4)
    full = _trainer(tmp_path / "full", **kw)
    full.train()
    steps_per_epoch = -(-len(full._train_batch_sampler) // 2)
    assert steps_per_epoch < 4  # the checkpoint lies in epoch >= 1
    logs_full = [h for h in full.state.log_history if "loss" in h]
    resumed = _trainer(tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    logs_resumed = [h for h in resumed.state.log_history if "loss" in h and h["step"] > 4]
    assert [h["step"] for h in logs_resumed] == [5]
    for k in ("loss", "logps/chosen", "batching/pairs_per_micro_batch"):
        assert logs_resumed[0][k] == pytest.approx(logs_full[4][k], rel=1e-5), k
