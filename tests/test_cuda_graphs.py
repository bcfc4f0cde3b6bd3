"""``ref_cuda_graphs`` and ``policy_cuda_graphs``: what the graphs rely on, on the CPU (tests/gpu/test_model_gpu.py
runs the graphs).

A graph is captured for one row length; rows are padded to it with one document (``PrefixLayout.padded``) and the
layout's tables are copied into the captured tensors, so (1) padding must not change any real token's attention and
(2) the tables' shapes must depend on the row length only. The policy's graphed stack also recomputes every layer in
the backward from the inputs the forward kept: run here without a graph (``capture=False``, the same path eagerly),
its gradients must be those of plain checkpointing.
"""

import copy

import pytest
import torch
from datasets import Dataset

from conftest import ARCHS, make_pairs, make_tokenizer, tiny_model
from prefix_attn import PrefixLayout, attention_tables, position_ids, prefix_attention, use_tables
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer
from prefixdpo.data.collator import PrefixPackingCollator
from test_exactness import VOCAB, dpo_loss, packed_logps, packed_model, random_examples, rel

LAYOUTS = [([5, 0, 3], [[2, 3], [4], [1, 1, 2]]), ([0], [[7]]), ([12], [[1, 9]])]


@pytest.mark.parametrize("prefix,branches", LAYOUTS)
@pytest.mark.parametrize("extra", [0, 1, 13])
def test_padding_document_leaves_every_real_token_unchanged(prefix, branches, extra):
    layout = PrefixLayout.from_lengths(prefix, branches)
    T = layout.total_tokens
    padded = layout.padded(T + extra)
    assert padded.total_tokens == T + extra
    assert torch.equal(padded.position_ids[:T], layout.position_ids)
    assert torch.equal(padded.position_ids[T:], torch.arange(extra))
    lo1, hi1, lo2 = (x[:T] for x in padded.query_key_ranges())
    for a, b in zip((lo1, hi1, lo2), layout.query_key_ranges()):
        assert torch.equal(a, b)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T + extra, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    out = prefix_attention(q, k, v, padded, backend="reference")
    alone = prefix_attention(q[:T], k[:T], v[:T], layout, backend="reference")
    torch.testing.assert_close(out[:T], alone, rtol=1e-12, atol=1e-12)  # float64: equal up to summation order
    if extra:  # the padding document attends to itself only, causally
        assert torch.allclose(out[T:], prefix_attention(q[T:], k[T:], v[T:], PrefixLayout.from_lengths([0], [[extra]]),
                                                        backend="reference"))


def test_padding_below_the_row_is_refused():
    with pytest.raises(ValueError, match="cannot pad"):
        PrefixLayout.from_lengths([3], [[2, 2]]).padded(5)


@pytest.mark.parametrize("groups", [1, 4])
def test_triton_tables_have_the_same_shapes_for_every_row_of_one_length(groups):
    total = 64
    shapes = []
    for prefix, branches in LAYOUTS + [([30, 2], [[10, 10], [5, 1]])]:
        padded = PrefixLayout.from_lengths(prefix, branches).padded(total)
        tables = attention_tables(padded, "triton", torch.float32, 16, groups)
        assert tables.tokens.position_ids.shape == (total,) and tables.tokens.ranges.shape == (3, total)
        shapes.append([t.shape for t in tables.tensors()])
    assert all(s == shapes[0] for s in shapes)
    assert attention_tables(PrefixLayout.from_lengths([3], [[2, 2]]), "reference", torch.float32, 16, 1) is None


def test_a_layout_reads_the_tables_it_is_given():
    # What a graph does with the tables (prefixdpo.modeling.graphs._Tables): a copy of a padded layout reads tensors of
    # its own (use_tables), refilled from another row's tables of the same length (copy_); the attention then
    # computes that row's output and derives nothing else on the layout (cached_keys).
    from prefix_attn.triton import triton_prefix_attention

    total = 64
    a, b = (PrefixLayout.from_lengths(p, br).padded(total) for p, br in LAYOUTS[:2])
    static = PrefixLayout.from_dict(a.to_dict())
    tables = attention_tables(a, "triton", torch.float32, 16, 2).clone()
    use_tables(static, tables)
    derived = static.cached_keys()
    tables.copy_(attention_tables(b, "triton", torch.float32, 16, 2))
    assert torch.equal(position_ids(static), b.position_ids)
    q, k, v = (torch.randn(total, h, 16, generator=torch.Generator().manual_seed(0)) for h in (4, 2, 2))
    torch.testing.assert_close(triton_prefix_attention(q, k, v, static), triton_prefix_attention(q, k, v, b),
                               rtol=0, atol=0)
    assert static.cached_keys() == derived
    with pytest.raises(ValueError, match="built tables of its own"):
        use_tables(static, tables)


@pytest.mark.parametrize("captured_on,replayed", [(0, 1), (1, 0)], ids=["short_then_long", "long_then_short"])
def test_a_graphs_layout_reads_every_windows_tables_whatever_row_it_was_made_from(captured_on, replayed):
    # A window of 6 cuts the long row's documents and none of the short row's: an eager call on the short row reads
    # the unwindowed tables, but a graph made from either row must read (and refill) the windowed ones for both.
    from prefix_attn.triton import triton_prefix_attention
    from prefixdpo.modeling.graphs import _bucketed, _Tables

    window = 20
    rows = [PrefixLayout.from_lengths([2] * 50, [[3]] * 50), PrefixLayout.from_lengths([100], [[70, 80]])]
    buckets = [_bucketed(r, "triton", torch.float16, (16, 2), 256, (window, 4096)) for r in rows]
    total = buckets[0][0]
    assert [b[0] for b in buckets] == [total, total] and [len(b[2]) for b in buckets] == [2, 2]  # 4096 >= the bucket
    assert buckets[0][2][1].window == window
    assert buckets[0][1].biting_window(window) is None and buckets[1][1].biting_window(window) == window
    static = _Tables(buckets[captured_on][1], buckets[captured_on][2])
    static.fill(buckets[replayed][2])
    q, k, v = (torch.randn(total, h, 16, generator=torch.Generator().manual_seed(1)) for h in (4, 2, 2))
    for w in (None, window):
        got = triton_prefix_attention(q, k, v, static.layout, window=static.layout.biting_window(w))
        want = triton_prefix_attention(q, k, v, buckets[replayed][1], window=w)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    static.check_captured()  # nothing built that fill does not refresh


def test_ref_cuda_graphs_on_the_cpu_trains_as_without(tmp_path):
    # Off a GPU the graphed backbone steps aside (the same forward runs); the switch must change nothing there.
    logs = []
    for graphs in (False, True):
        model = tiny_model("llama", seed=0)
        args = PrefixDPOConfig(output_dir=str(tmp_path / str(graphs)), report_to="none", bf16=False, use_cpu=True,
                               per_device_train_batch_size=4, max_steps=2, logging_steps=1, save_strategy="no",
                               disable_tqdm=True, gradient_checkpointing=False, ref_cuda_graphs=graphs)
        trainer = PrefixDPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                   train_dataset=Dataset.from_list(make_pairs(8)), processing_class=make_tokenizer())
        trainer.train()
        assert hasattr(trainer.ref_model.model, "_prefixdpo_graphs") == graphs
        logs.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert logs[0] == logs[1]


def _train_step(model, batch, ref):
    model.zero_grad(set_to_none=True)
    logps = packed_logps(model, batch)
    dpo_loss(logps, ref).backward()
    return logps.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("arch", ARCHS)
def test_policy_stack_graphed_path_gives_the_gradients_of_checkpointing(arch, caplog):
    # float32 with and without the graphed path against float64 without it: the graphed path's error may be at most
    # 2x plain float32's (+ rounding). Rows of ~100 tokens padded to 256: the padding document's share is large.
    from prefixdpo.modeling.graphs import enable_policy_graphs

    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    want_model, plain, graphed = (packed_model(model.to(dt)) for dt in (torch.float64, torch.float32, torch.float32))
    with caplog.at_level("WARNING"):
        assert enable_policy_graphs(graphed, capture=False)
    stacks = graphed.model._prefixdpo_stacks
    for seed, n in [(5, 8), (6, 5), (5, 8)]:
        batch = PrefixPackingCollator(pad_token_id=0)(random_examples(n, seed=seed))
        ref = torch.randn(2 * n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        want, want_g = _train_step(want_model, batch, ref)
        a, a_g = _train_step(plain, batch, ref.float())
        b, b_g = _train_step(graphed, batch, ref.float())
        assert rel(b.double(), want) <= 2 * rel(a.double(), want) + 1e-7
        assert len(b_g) == len(want_g) and all(g is not None for g in b_g)
        for x, y, w in zip(a_g, b_g, want_g):
            assert rel(y.double(), w) <= 2 * rel(x.double(), w) + 1e-6
    assert list(stacks) == [256], list(stacks)


def test_policy_stack_refuses_a_backbone_that_is_not_a_chain_of_layers(caplog):
    # Granite scales the embeddings between the embedding module and the first layer: the recomputation from the
    # layers' inputs would miss that step, so the capture is refused (once, with a warning); the model runs as before.
    from prefixdpo.modeling.graphs import enable_policy_graphs

    model = tiny_model("granite", vocab_size=VOCAB, seed=1, embedding_multiplier=2.0)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    plain, graphed = packed_model(model), packed_model(model)
    assert enable_policy_graphs(graphed, capture=False)
    batch = PrefixPackingCollator(pad_token_id=0)(random_examples(4, seed=3))
    ref = torch.zeros(8)
    with caplog.at_level("WARNING"):
        b, b_g = _train_step(graphed, batch, ref)
    a, a_g = _train_step(plain, batch, ref)
    assert "not embeddings -> decoder layers -> norm" in caplog.text and not graphed.model._prefixdpo_stacks
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    for x, y in zip(a_g, b_g):
        torch.testing.assert_close(y, x, rtol=0, atol=0)


def test_policy_graphs_step_aside_where_they_do_not_apply(caplog):
    from prefixdpo.modeling.graphs import enable_policy_graphs

    with caplog.at_level("WARNING"):
        assert not enable_policy_graphs(tiny_model("llama", vocab_size=VOCAB, attention_dropout=0.1), capture=False)
    assert "dropout" in caplog.text
    model = packed_model(tiny_model("llama", vocab_size=VOCAB))
    assert enable_policy_graphs(model, capture=False)
    batch = PrefixPackingCollator(pad_token_id=0)(random_examples(3, seed=1))
    packed_logps(model, batch).sum().backward()  # no gradient checkpointing: the plain forward
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with torch.no_grad():
        packed_logps(model, batch)  # no autograd (evaluation, a reference pass)
    model.eval()
    packed_logps(model, batch)
    assert not model.model._prefixdpo_stacks


@pytest.mark.parametrize("lora", [False, True])
def test_policy_cuda_graphs_in_the_trainer_give_the_steps_of_checkpointing(tmp_path, monkeypatch, lora):
    # The trainer's path through the graphed stack (run eagerly here: capture=False) against plain reentrant
    # checkpointing: same losses and weights after three SGD steps, float32. LoRA: only the adapters train, the
    # embedding is frozen (the stack's input is made to require grad), the reference is the policy with adapters off.
    from peft import LoraConfig

    import prefixdpo.modeling.graphs as graphs

    real = graphs.enable_policy_graphs
    monkeypatch.setattr(graphs, "enable_policy_graphs", lambda m, **kw: real(m, capture=False))
    runs = []
    for on in (False, True):
        model = tiny_model("llama", seed=0)
        args = PrefixDPOConfig(output_dir=str(tmp_path / str(on)), report_to="none", bf16=False, use_cpu=True,
                               per_device_train_batch_size=4, max_steps=3, logging_steps=1, save_strategy="no",
                               disable_tqdm=True, gradient_checkpointing=True, policy_cuda_graphs=on,
                               learning_rate=0.5, optim="sgd")
        peft = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0) if lora else None
        trainer = PrefixDPOTrainer(model=model, ref_model=None if lora else copy.deepcopy(model), args=args,
                                   train_dataset=Dataset.from_list(make_pairs(12, seed=2)),
                                   processing_class=make_tokenizer(), peft_config=peft)
        trainer.train()
        stacks = getattr(trainer._packed_policy().model, "_prefixdpo_stacks", None)
        assert (bool(stacks) if on else stacks is None), stacks
        logs = [h for h in trainer.state.log_history if "loss" in h]
        runs.append(([h["loss"] for h in logs], torch.cat([p.detach().flatten() for p in trainer.model.parameters()]),
                     logs[-1]["rewards/margins"]))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    torch.testing.assert_close(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-6)
    assert runs[1][2] != 0.0  # the policy trained: its rewards moved away from the reference's
