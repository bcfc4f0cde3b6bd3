"""group_by_prompt: micro-batches that keep the pairs of one prompt together.

The samplers: every pair once per epoch, whole groups where the sizes allow, TRL's pairs per micro-batch in the
"pairs" mode, the budget held (counted with sharing) in the "token_budget" mode, a pure function of (seed, epoch). The
trainer: "auto" groups only datasets that repeat prompts, the logged sharing on UltraFeedback-like data (2 prompts x 4
responses x all 6 pairs, 4 pairs per micro-batch), resume, and token budgets over groups.
"""

import copy
import random

import pytest
import torch
from datasets import Dataset
from torch.utils.data import RandomSampler

from conftest import make_all_pairs, make_pairs, make_tokenizer, tiny_model
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer
from prefixdpo.data.batching import TokenBudgetBatchSampler, packed_lengths
from prefixdpo.data.collator import PACKED_KEY, PrefixPackingCollator
from prefixdpo.data.grouping import PromptGroupedSampler, prompt_groups, training_micro_batches, use_prompt_groups
from prefixdpo.data.packing import pair_shapes
from prefixdpo.data.sharing import predict_sharing


def random_groups(n_groups, seed=0, sizes=(1, 11)):
    rng = random.Random(seed)
    groups, start = [], 0
    for _ in range(n_groups):
        k = rng.randint(*sizes)
        groups.append(list(range(start, start + k)))
        start += k
    order = list(range(start))  # pairs of a group need not be adjacent in the dataset
    rng.shuffle(order)
    return [[order[i] for i in g] for g in groups]


@pytest.mark.parametrize("batch_size", [1, 4, 6])
def test_pair_sampler_keeps_groups_whole_where_sizes_allow(batch_size):
    groups = random_groups(40, seed=batch_size)
    sampler = PromptGroupedSampler(groups, batch_size, seed=3)
    group_of = {i: g for g, members in enumerate(groups) for i in members}
    n = sum(map(len, groups))
    for epoch in range(3):
        sampler.set_epoch(epoch)
        order = list(sampler)
        assert sorted(order) == list(range(n)) and len(sampler) == n
        batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]  # what the DataLoader cuts
        assert batches == sampler.batches(epoch)
        # A group of k pairs fills k // batch_size micro-batches of its own, and its remainder is split at most once.
        single = sum(len({group_of[i] for i in b}) == 1 and len(b) == batch_size for b in batches)
        assert single >= sum(len(g) // batch_size for g in groups)
        spans = [len({j for j, b in enumerate(batches) for i in b if group_of[i] == g}) for g in range(len(groups))]
        assert all(span <= len(g) // batch_size + 2 for span, g in zip(spans, groups))


def test_pair_sampler_is_a_function_of_seed_and_epoch():
    groups = random_groups(30, seed=1)
    a, b = PromptGroupedSampler(groups, 4, seed=7), PromptGroupedSampler(groups, 4, seed=7)
    assert a.batches(0) == b.batches(0) and a.batches(1) == b.batches(1)
    assert a.batches(0) != a.batches(1)
    assert PromptGroupedSampler(groups, 4, seed=8).batches(0) != a.batches(0)
    # Evaluation: no shuffle, the groups in order, each group's pairs in theirs.
    e = PromptGroupedSampler([[0, 1, 2], [3, 4], [5]], 2, shuffle=False)
    assert e.batches(0) == e.batches(5) == [[0, 1], [3, 4], [2, 5]]


def test_auto_groups_only_repeated_prompts_under_random_sampling():
    assert use_prompt_groups("auto", [[0, 1], [2]]) and not use_prompt_groups("auto", [[0], [1], [2]])
    assert not use_prompt_groups("auto", [[0, 1]], sampling_strategy="sequential")
    assert use_prompt_groups("always", [[0], [1]]) and not use_prompt_groups("never", [[0, 1]])


def _tokenized(rows):
    tok = make_tokenizer()
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    return [{"prompt_ids": ids(r["prompt"]), "chosen_ids": ids(r["chosen"]) + [tok.eos_token_id],
             "rejected_ids": ids(r["rejected"]) + [tok.eos_token_id]} for r in rows]


def test_token_budget_over_groups_holds_the_budget_counted_with_sharing():
    data = _tokenized(make_all_pairs(prompts=30, responses=4, seed=2, prompt=(5, 30), response=(2, 20)))
    random.Random(0).shuffle(data)
    groups = prompt_groups(Dataset.from_list(data))
    assert len(groups) == 30 and all(len(g) == 6 for g in groups)
    shapes = [pair_shapes(ex, 40, "keep_start", True) for ex in data]
    lengths = packed_lengths(shapes)
    budget = 160
    grouped = TokenBudgetBatchSampler(lengths, budget, seed=0, num_epochs=2, groups=groups, shapes=shapes)
    plain = TokenBudgetBatchSampler(lengths, budget, seed=0, num_epochs=2)
    collator = PrefixPackingCollator(pad_token_id=0, max_length=40)
    for epoch in range(2):
        batches = grouped.batches(epoch)
        assert sorted(i for b in batches for i in b) == list(range(len(data)))
        for b in batches:
            assert collator([data[i] for i in b])[PACKED_KEY]["stats"]["packed_tokens"] <= budget
    # A group of 6 pairs packs to fewer tokens than its pairs alone: the same data needs fewer rows.
    assert len(grouped) < 0.75 * len(plain)
    forecast = lambda s: predict_sharing([[data[i] for i in b] for b in s.batches(0)], 40)  # noqa: E731
    assert forecast(grouped).responses_deduplicated_frac > 0.4 > forecast(plain).responses_deduplicated_frac


def test_token_budget_cuts_a_group_larger_than_the_budget():
    data = _tokenized(make_all_pairs(prompts=3, responses=6, seed=3, prompt=(20, 30), response=(10, 20)))
    groups = prompt_groups(Dataset.from_list(data))
    shapes = [pair_shapes(ex, None, "keep_start", True) for ex in data]
    lengths = packed_lengths(shapes)
    budget = max(lengths) + 20  # every pair fits; a whole group of 15 pairs does not
    sampler = TokenBudgetBatchSampler(lengths, budget, seed=1, groups=groups, shapes=shapes)
    collator = PrefixPackingCollator(pad_token_id=0)
    batches = sampler.batches(0)
    assert len(batches) > len(groups)
    assert all(collator([data[i] for i in b])[PACKED_KEY]["stats"]["packed_tokens"] <= budget for b in batches)
    with pytest.raises(ValueError, match="shapes"):
        TokenBudgetBatchSampler(lengths, budget, groups=groups)


# ---------------------------------------------------------------------------------------------------- the trainer
ALL_PAIRS = make_all_pairs(prompts=2, responses=4, seed=0, prompt=(30, 30))  # 12 pairs; responses of 3-8 words


def _trainer(tmp_path, data, **kw):
    model = tiny_model("llama", seed=0)
    base = dict(output_dir=str(tmp_path), report_to="none", bf16=False, per_device_train_batch_size=4,
                max_steps=3, logging_steps=1, learning_rate=0.5, optim="sgd", gradient_checkpointing=False, seed=0,
                save_strategy="no", max_length=40, disable_tqdm=True)
    return PrefixDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=PrefixDPOConfig(**{**base, **kw}),
                            train_dataset=Dataset.from_list(data), processing_class=make_tokenizer())


def test_grouped_training_saves_what_the_forecast_says(tmp_path):
    trainer = _trainer(tmp_path, ALL_PAIRS)
    sampler = trainer.get_train_dataloader().batch_sampler.sampler
    assert isinstance(sampler, PromptGroupedSampler) and trainer.args.group_by_prompt == "auto"
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    saved = [h["prefix_sharing/tokens_saved_frac"] for h in logs]
    deduplicated = [h["prefix_sharing/responses_deduplicated_frac"] for h in logs]
    # The epoch's 3 micro-batches: each prompt's 6 pairs fill one micro-batch of 4 and half of the mixed one.
    batches = trainer._train_pair_sampler.batches(0)
    assert sorted(len({tuple(trainer.train_dataset[i]["prompt_ids"]) for i in b}) for b in batches) == [1, 1, 2]
    per_pair = predict_sharing([[trainer.train_dataset[i]] for i in range(12)], max_length=40)
    forecast = predict_sharing([[trainer.train_dataset[i] for i in b] for b in batches], max_length=40)
    assert sum(saved) / 3 == pytest.approx(forecast.tokens_saved_frac, rel=1e-9)
    assert sum(deduplicated) / 3 == pytest.approx(forecast.responses_deduplicated_frac, rel=1e-9)
    assert 0.38 < per_pair.tokens_saved_frac < 0.42  # each pair's prompt once: what sharing within a pair gives
    assert sum(saved) / 3 >= 0.55, saved
    assert min(deduplicated) > 0.2 and per_pair.responses_deduplicated_frac == 0.0


@pytest.mark.parametrize("batching", ["pairs", "token_budget"])
def test_the_forecasts_micro_batches_are_the_trainers(batching, tmp_path):
    kw = dict(batching="token_budget", max_tokens_per_batch=90) if batching == "token_budget" else {}
    trainer = _trainer(tmp_path, ALL_PAIRS, **kw)
    sampler = trainer.get_train_dataloader().batch_sampler
    sampler = sampler if batching == "token_budget" else sampler.sampler
    assert training_micro_batches(trainer.train_dataset, trainer.args) == sampler.batches(0)
    if batching == "pairs":  # TRL's sequential order, which auto does not regroup
        sequential = PrefixDPOConfig(**{**trainer.args.to_dict(), "train_sampling_strategy": "sequential"})
        assert training_micro_batches(trainer.train_dataset, sequential) == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                                             [8, 9, 10, 11]]


def test_auto_keeps_trls_order_without_repeated_prompts(tmp_path):
    trainer = _trainer(tmp_path, make_pairs(8, seed=1))
    assert isinstance(trainer._get_train_sampler(), RandomSampler) and trainer._train_pair_sampler is None
    never = _trainer(tmp_path, ALL_PAIRS, group_by_prompt="never")
    assert isinstance(never._get_train_sampler(), RandomSampler)


def test_resume_with_grouping_reaches_the_same_weights(tmp_path):
    # 12 pairs in 3 micro-batches of 4 per epoch: steps 1-3 are epoch 0, steps 4-5 epoch 1 (reshuffled); the run is
    # interrupted after step 4, inside epoch 1, and resumed.
    kw = dict(max_steps=5, save_strategy="steps", save_steps=4)
    full = _trainer(tmp_path / "full", ALL_PAIRS, **kw)
    full.train()
    assert full._train_pair_sampler.batches(0) != full._train_pair_sampler.batches(1)
    resumed = _trainer(tmp_path / "resumed", ALL_PAIRS, **kw)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"))
    assert [h["step"] for h in resumed.state.log_history if "loss" in h and h["step"] > 4] == [5]
    for (name, p), (_, q) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(p, q), name


def test_token_budget_with_grouping_trains_every_pair_once_per_step(tmp_path):
    # All 12 pairs in one step: "pairs" with one micro-batch of 12 against token budgets that hold ~1-2 groups.
    ref = _trainer(tmp_path / "pairs", ALL_PAIRS, per_device_train_batch_size=12, max_steps=1)
    ref.train()
    ours = _trainer(tmp_path / "budget", ALL_PAIRS, batching="token_budget", max_tokens_per_batch=80, max_steps=1,
                    gradient_accumulation_steps=16)
    ours.train()
    batches = ours._train_batch_sampler.batches(0)
    assert len(batches) > 1 and sorted(i for b in batches for i in b) == list(range(12))
    for (name, p1), (_, p2) in zip(ref.model.named_parameters(), ours.model.named_parameters()):
        assert torch.allclose(p1, p2, rtol=1e-5, atol=1e-7), name
    log = next(h for h in ours.state.log_history if "loss" in h)
    assert log["prefix_sharing/responses_deduplicated_frac"] > 0.2


def test_config_checks(tmp_path):
    def cfg(**kw):
        return PrefixDPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none", **kw)

    assert cfg().group_by_prompt == "auto"
    with pytest.raises(ValueError, match="group_by_prompt must be"):
        cfg(group_by_prompt="yes")
    with pytest.raises(ValueError, match="train_sampling_strategy"):
        cfg(group_by_prompt="always", train_sampling_strategy="group_by_length")
