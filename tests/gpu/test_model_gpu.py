"""The core exactness tests on the GPU with the GPU backends (run there: python -m pytest -m gpu tests/gpu)."""

import pytest
import torch

from conftest import FAMILIES, tiny_model
from test_exactness import (PrefixPackingCollator, VOCAB, dpo_loss, grads, packed_logps, packed_model, random_examples,
                            rel)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def to_cuda(batch):
    if isinstance(batch, dict):
        return {k: to_cuda(v) for k, v in batch.items()}
    return batch.cuda() if isinstance(batch, torch.Tensor) else batch


@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma", "phi3"])
def test_packed_logps_and_grads_equal_unshared_on_gpu(arch, backend):
    # head_dim 16: the triton kernels take head dims 16..128 (the CPU tests' tiny models use 8)
    dims = dict(hidden_size=64, head_dim=16) if arch in ("qwen3", "gemma") else dict(hidden_size=64)
    model = tiny_model(arch, vocab_size=VOCAB, seed=1, **dims).cuda()
    examples = random_examples(12, seed=5, max_prompt=200, max_resp=150)  # rows past one 128-token tile
    assert_packed_equals_alone_on_gpu(model, examples, backend)


def assert_packed_equals_alone_on_gpu(model, examples, backend):
    """Log-probs and the gradients of a DPO loss over them: the packed row against each prompt + response alone
    through the unpatched model, on the GPU."""
    batch = to_cuda(PrefixPackingCollator(pad_token_id=0)(examples))
    pm = packed_model(model, backend)
    got = packed_logps(pm, batch)
    res = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = torch.tensor([ex["prompt_ids"] + ex[key]], device="cuda")
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
            res.append(lp[len(ex["prompt_ids"]) - 1 :].sum())
    want = torch.stack(res)
    assert rel(got, want) < 1e-5, (got, want)
    ref = want.detach() + torch.randn_like(want)
    for a, b in zip(grads(pm, dpo_loss(got, ref)), grads(model, dpo_loss(want, ref))):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("backend", ["triton", "flex"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_families_packed_logps_and_grads_equal_unshared_on_gpu(arch, backend):
    # Sliding windows of 48 positions (layers with and without one in a row) against prompts and responses of up to
    # 200 and 150 tokens, across the kernels' 64/128-token tiles; Gemma 2's soft-cap, gpt-oss's sinks, LFM2's short
    # convolutions. float32.
    window = {} if arch == "lfm2" else {"sliding_window": 48}
    model = tiny_model(arch, vocab_size=VOCAB, seed=1, hidden_size=64, head_dim=16, **window).cuda()
    assert_packed_equals_alone_on_gpu(model, random_examples(12, seed=6, max_prompt=200, max_resp=150), backend)


@pytest.mark.parametrize("arch", ["gemma2", "gpt_oss"])
def test_families_reference_cuda_graphs_match_the_eager_backbone(arch):
    """``ref_cuda_graphs`` on models with sliding windows (48 positions: rows whose documents it cuts and rows whose
    documents it does not, replayed by one graph), soft-capping and sinks, as for Llama below."""
    import copy

    from prefixdpo.modeling.graphs import enable_reference_graphs

    model = tiny_model(arch, vocab_size=VOCAB, seed=1, hidden_size=64, head_dim=16, sliding_window=48).cuda()
    want_model = packed_model(model, "triton")
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    eager, graphed = packed_model(bf16, "triton"), packed_model(bf16, "triton")
    enable_reference_graphs(graphed)
    # short documents first (the window cuts none: the graph is captured on them), then long ones in the same bucket
    for seed, n, prompt, resp in [(5, 12, 8, 6), (6, 2, 90, 40), (7, 12, 8, 6)]:
        examples = random_examples(n, seed=seed, max_prompt=prompt, max_resp=resp)
        batch = to_cuda(PrefixPackingCollator(pad_token_id=0)(examples))
        with torch.no_grad():
            want = packed_logps(want_model, batch).double()
            a = packed_logps(eager, batch).double()
            b = packed_logps(graphed, batch).double()
        assert rel(b, want) <= 2 * rel(a, want) + 1e-6, (seed, rel(a, want), rel(b, want))
    assert len(graphed.model._prefixdpo_graphs) >= 1


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_liger_kernels_keep_packed_logps_and_grads_exact_on_gpu(arch):
    """``use_liger_kernel=True`` (Liger's RMSNorm, RoPE, SwiGLU) in the packed path, against the unpatched model run on
    each prompt + response alone: the same contract as without Liger, float32."""
    import copy
    import importlib

    liger = pytest.importorskip("liger_kernel.transformers")
    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    saved = dict(vars(module))  # Liger replaces classes and the rotary function module-wide: put them back after
    try:
        dims = dict(hidden_size=64, head_dim=16) if arch == "qwen3" else dict(hidden_size=64)
        model = tiny_model(arch, vocab_size=VOCAB, seed=1, **dims).cuda()
        examples = random_examples(12, seed=5, max_prompt=200, max_resp=150)
        batch = to_cuda(PrefixPackingCollator(pad_token_id=0)(examples))
        res = []
        for key in ("chosen_ids", "rejected_ids"):
            for ex in examples:
                ids = torch.tensor([ex["prompt_ids"] + ex[key]], device="cuda")
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])
                res.append(lp[len(ex["prompt_ids"]) - 1 :, 0].sum())
        want = torch.stack(res)
        ref = want.detach() + torch.randn_like(want)
        want_grads = grads(model, dpo_loss(want, ref))
        patched = copy.deepcopy(model)
        liger._apply_liger_kernel_to_instance(model=patched, fused_linear_cross_entropy=False)
        assert patched.model.layers[0].mlp._get_name().startswith("Liger")  # the kernels are really in
        pm = packed_model(patched, "triton")
        got = packed_logps(pm, batch)
        assert rel(got, want) < 1e-5, (got, want)
        for a, b in zip(grads(pm, dpo_loss(got, ref)), want_grads):
            assert rel(a, b) < 1e-4
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def test_reference_cuda_graphs_match_the_eager_backbone():
    """``ref_cuda_graphs``: the graphed reference backbone (rows padded to a 256-token bucket) against the eager one,
    in bf16, each against float32: the graph's error may be at most 2x the eager bf16 error (+ rounding)."""
    import copy

    from prefixdpo.modeling.graphs import enable_reference_graphs

    model = tiny_model("llama", vocab_size=VOCAB, seed=1, hidden_size=64).cuda()
    want_model = packed_model(model, "triton")  # float32
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    eager = packed_model(bf16, "triton")
    graphed = packed_model(bf16, "triton")
    enable_reference_graphs(graphed)
    lengths = []
    for seed, n in [(5, 12), (6, 7), (7, 12), (5, 12)]:  # two buckets at least; the last row repeats the first
        examples = random_examples(n, seed=seed, max_prompt=200, max_resp=150)
        batch = to_cuda(PrefixPackingCollator(pad_token_id=0)(examples))
        lengths.append(batch["prefix_packed"]["layout"]["total_tokens"])
        with torch.no_grad():
            want = packed_logps(want_model, batch).double()
            a = packed_logps(eager, batch).double()
            b = packed_logps(graphed, batch).double()
        assert rel(b, want) <= 2 * rel(a, want) + 1e-6, (lengths[-1], rel(a, want), rel(b, want))
    graphs = graphed.model._prefixdpo_graphs
    assert len(graphs) == len({-(-t // 256) * 256 for t in lengths}) >= 2, (lengths, list(graphs))
    # With autograd on (a policy's forward) the backbone runs eagerly, not from a graph.
    batch = to_cuda(PrefixPackingCollator(pad_token_id=0)(random_examples(3, seed=9)))
    assert packed_logps(graphed, batch).requires_grad


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_policy_cuda_graphs_match_eager_checkpointing(arch):
    """``policy_cuda_graphs``: the graphed decoder stack (forward replayed, rows padded to a 256-token bucket; the
    backward recomputes eagerly) against eager reentrant checkpointing, in bf16, each against float32, log-probs and
    every gradient: the graph's error may be at most 2x the eager bf16 error (+ rounding). Between steps the weights
    change in place, as an optimizer step does: the replays must see them."""
    import copy

    from prefixdpo.modeling.graphs import enable_policy_graphs

    dims = dict(hidden_size=64, head_dim=16) if arch == "qwen3" else dict(hidden_size=64)
    model = tiny_model(arch, vocab_size=VOCAB, seed=1, **dims).cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    want_model = packed_model(model, "triton")  # float32
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    eager, graphed = packed_model(bf16, "triton"), packed_model(bf16, "triton")
    assert enable_policy_graphs(graphed)
    models = (want_model, eager, graphed)
    lengths = []
    for step, (seed, n) in enumerate([(5, 12), (6, 7), (7, 12), (5, 12)]):  # the last row repeats the first
        batch = to_cuda(PrefixPackingCollator(pad_token_id=0)(random_examples(n, seed=seed, max_prompt=200,
                                                                              max_resp=150)))
        lengths.append(batch["prefix_packed"]["layout"]["total_tokens"])
        ref = torch.randn(2 * n, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        results = []
        for m in models:
            m.zero_grad(set_to_none=True)
            logps = packed_logps(m, batch)
            dpo_loss(logps, ref).backward()
            results.append((logps.detach().double(), [p.grad.double() for p in m.parameters()]))
        (want, want_g), (a, a_g), (b, b_g) = results
        assert rel(b, want) <= 2 * rel(a, want) + 1e-6, (step, rel(a, want), rel(b, want))
        for name, x, y, w in zip([n for n, _ in model.named_parameters()], a_g, b_g, want_g):
            assert rel(y, w) <= 2 * rel(x, w) + 1e-4, (step, name, rel(x, w), rel(y, w))
        with torch.no_grad():  # an in-place update of every weight, the same in all three models
            g = torch.Generator("cuda").manual_seed(100 + step)
            for ps in zip(*(m.parameters() for m in models)):
                d = 0.05 * torch.randn(ps[0].shape, device="cuda", generator=g)
                for p in ps:
                    p.add_(d.to(p.dtype))
    stacks = graphed.model._prefixdpo_stacks
    assert len(stacks) == len({-(-t // 256) * 256 for t in lengths}) >= 2, (lengths, list(stacks))
    assert all(s.graph is not None for s in stacks.values())
