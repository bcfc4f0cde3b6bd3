"""``ref_cuda_graphs``: what the graphs rely on, on the CPU (tests/gpu/test_model_gpu.py runs the graphs).

A graph is captured for one row length; rows are padded to it with one document (``PrefixLayout.padded``) and the
layout's tables are copied into the captured tensors, so (1) padding must not change any real token's attention and
(2) the tables' shapes must depend on the row length only.
"""

import copy

import pytest
import torch
from datasets import Dataset

from conftest import make_pairs, make_tokenizer, tiny_model
from prefix_attn import PrefixLayout, attention_tables, prefix_attention
from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

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
        flat = {k: [t.shape for t in (v if isinstance(v, tuple) else (v,))] for k, v in tables.items()}
        assert "position_ids" in flat and "triton_tok" in flat
        shapes.append(flat)
    assert all(s == shapes[0] for s in shapes)
    assert attention_tables(PrefixLayout.from_lengths([3], [[2, 2]]), "reference", torch.float32, 16, 1) is None


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
