"""The exactness contract (docs/DESIGN.md): packed, prefix-shared log-probs and gradients equal those of running each
prompt + response alone, in float32 on the CPU, for tiny random-init models of real architectures; also for rows where
several pairs share a prompt and responses (each run once)."""

import copy
import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from trl.trainer.utils import add_fused_lm_head

from conftest import ARCHS, FAMILIES, tiny_model
from prefixdpo.data.collator import PACKED_KEY, PrefixPackingCollator
from prefixdpo.data.packing import truncate_sequence
from prefixdpo.modeling.attention import UnsupportedModelError, check_config_supported
from prefixdpo.modeling.packed import enable_packed_forward

VOCAB = 50


def random_examples(n, seed, max_prompt=12, max_resp=9):
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(4, VOCAB) for _ in range(k)]  # noqa: E731
    out = []
    for i in range(n):
        chosen = tok(rng.randint(1, max_resp))
        out.append({
            "prompt_ids": tok(1 if i % 4 == 0 else rng.randint(1, max_prompt)),  # prompts of 1 token included
            "chosen_ids": chosen,
            "rejected_ids": list(chosen) if i % 5 == 1 else tok(1 if i % 3 == 0 else rng.randint(1, max_resp)),
        })
    return out


def packed_model(model, backend="reference"):
    m = copy.deepcopy(model)
    add_fused_lm_head(m, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    enable_packed_forward(m, backend)
    return m


def packed_logps(model, batch):
    kwargs = {k: v for k, v in batch.items() if k not in ("completion_mask",)}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(**kwargs, labels=labels, fused_lm_head=True)
    return out.log_probs.sum(1)


def unshared_logps(model, examples, max_length=None, mode="keep_start"):
    """Each prompt + response alone through the unpatched model (its own SDPA), log-softmax over full logits."""
    res = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            p, c = truncate_sequence(ex["prompt_ids"], ex[key], max_length, mode)
            ids = torch.tensor([p + c])
            logits = model(input_ids=ids).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None])[:, 0]
            n_score = len(c) if p else len(c) - 1
            res.append(lp[len(lp) - n_score :].sum() if n_score else lp.sum() * 0)
    return torch.stack(res)


def dpo_loss(logps, ref):
    c, r = logps.chunk(2)
    rc, rr = ref.chunk(2)
    return -F.logsigmoid(0.1 * ((c - rc) - (r - rr))).mean()


def grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_packed_equals_alone(model, batch, examples, backend="reference"):
    """The packed row's log-probs, and the gradients of a DPO loss over them, equal each sequence run alone."""
    pm = packed_model(model, backend)
    got = packed_logps(pm, batch)
    want = unshared_logps(model, examples)
    assert rel(got, want) < 1e-5, (got, want)

    ref = want.detach() + torch.randn_like(want)
    g_packed = grads(pm, dpo_loss(got, ref))
    g_plain = grads(model, dpo_loss(unshared_logps(model, examples), ref))
    for a, b in zip(g_packed, g_plain):
        assert rel(a, b) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logps_and_grads_equal_unshared(arch):
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    examples = random_examples(9, seed=hash(arch) % 1000)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    assert batch[PACKED_KEY]["stats"]["shared_pairs"] == len(examples)
    assert_packed_equals_alone(model, batch, examples)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_packed_logps_and_grads_equal_unshared_on_sdpa(arch):
    """The sdpa backend (``auto``'s choice for rows of long prefixes) through a whole model, with prompts and
    responses shared in the row."""
    torch.manual_seed(0)
    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    examples = examples_sharing_responses(seed=7)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    assert_packed_equals_alone(model, batch, examples, backend="sdpa")


def examples_sharing_responses(seed, prompts=3, responses=4, max_prompt=10, max_resp=8):
    """Every pair of ``responses`` responses for each of ``prompts`` prompts (the first prompt of one token), in a
    shuffled order, so documents and branches are shared by pairs that are not adjacent. Responses of one prompt begin
    with the same 3 tokens (a keep_start cut can make them equal), and prompt 1 reuses a response of prompt 0."""
    rng = random.Random(seed)
    tok = lambda k: [rng.randrange(4, VOCAB) for _ in range(k)]  # noqa: E731
    out = []
    for p in range(prompts):
        prompt = tok(1 if p == 0 else rng.randint(2, max_prompt))
        start = tok(3)
        resp = [start + tok(rng.randint(1, max_resp)) for _ in range(responses)]
        if p == 1:
            resp[0] = list(out[0]["chosen_ids"])
        out += [{"prompt_ids": prompt, "chosen_ids": resp[a], "rejected_ids": resp[b]}
                for a, b in itertools.combinations(range(responses), 2)]
    rng.shuffle(out)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_deduplicated_row_logps_and_grads_equal_each_pair_alone(arch):
    # Each prompt once and each distinct response once in the row; every pair's log-probs and the gradients of a loss
    # over all pairs equal those of running every prompt + response alone.
    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    examples = examples_sharing_responses(seed=len(arch))
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    layout = batch[PACKED_KEY]["layout"]
    distinct = {(tuple(e["prompt_ids"]), tuple(e[k])) for e in examples for k in ("chosen_ids", "rejected_ids")}
    assert len(layout["prefix_lens"]) == len({tuple(e["prompt_ids"]) for e in examples}) == 3
    assert len(layout["branch_lens"]) == len(distinct) == 12 < 2 * len(examples)
    assert_packed_equals_alone(model, batch, examples)


@pytest.mark.parametrize("mode,max_length", [("keep_start", 7), ("keep_end", 10)])
def test_deduplication_follows_trl_truncation(mode, max_length):
    # keep_start at 7 cuts responses within their common beginning for the longer prompts: responses that differ only
    # after the cut become one branch. keep_end at 10 cuts prompts by amounts that depend on the response: sequences
    # of one prompt then share a document only where their cut prompts are equal, and a sequence whose prompt is cut
    # away entirely is a document of its own.
    model = tiny_model("llama", vocab_size=VOCAB, seed=2)
    examples = [e for e in examples_sharing_responses(seed=5) if len(e["prompt_ids"]) < max_length]
    batch = PrefixPackingCollator(pad_token_id=0, max_length=max_length, truncation_mode=mode)(examples)
    cut = [truncate_sequence(e["prompt_ids"], e[k], max_length, mode) for e in examples
           for k in ("chosen_ids", "rejected_ids")]
    shared = {(tuple(p), tuple(c)) for p, c in cut if p}
    layout = batch[PACKED_KEY]["layout"]
    assert len(layout["branch_lens"]) == len(shared) + sum(not p for p, _ in cut) < len(cut)
    assert len(layout["prefix_lens"]) == len({tuple(p) for p, _ in cut if p}) + sum(not p for p, _ in cut)
    if mode == "keep_start":
        assert len(shared) < len({(tuple(e["prompt_ids"]), tuple(e[k])) for e in examples for k in ("chosen_ids",
                                                                                                   "rejected_ids")})
    else:
        assert len(layout["prefix_lens"]) > len({tuple(e["prompt_ids"]) for e in examples})
    assert rel(packed_logps(packed_model(model), batch), unshared_logps(model, examples, max_length, mode)) < 1e-5


@pytest.mark.parametrize("mode,max_length", [("keep_start", 9), ("keep_end", 9), ("keep_end", 4)])
def test_truncation_matches_trl_and_stays_exact(mode, max_length):
    model = tiny_model("llama", vocab_size=VOCAB, seed=2)
    examples = [e for e in random_examples(10, seed=7, max_prompt=8, max_resp=8) if len(e["prompt_ids"]) < max_length]
    batch = PrefixPackingCollator(pad_token_id=0, max_length=max_length, truncation_mode=mode)(examples)
    got = packed_logps(packed_model(model), batch)
    want = unshared_logps(model, examples, max_length, mode)
    assert rel(got, want) < 1e-5


def test_unshared_switch_gives_the_same_logps_with_more_tokens():
    model = tiny_model("qwen2", vocab_size=VOCAB, seed=3)
    examples = random_examples(6, seed=11)
    shared = PrefixPackingCollator(pad_token_id=0)(examples)
    unshared = PrefixPackingCollator(pad_token_id=0, prefix_sharing=False)(examples)
    pm = packed_model(model)
    assert rel(packed_logps(pm, shared), packed_logps(pm, unshared)) < 1e-5
    s, u = shared[PACKED_KEY]["stats"], unshared[PACKED_KEY]["stats"]
    assert u["packed_tokens"] == u["unshared_tokens"] > s["packed_tokens"]
    # Sharing saves each pair's second prompt (less the token that opens a branch), and a pair whose chosen equals its
    # rejected runs that response once.
    repeated = sum(1 + len(e["chosen_ids"]) for e in examples if e["chosen_ids"] == e["rejected_ids"])
    assert repeated > 0
    assert s["unshared_tokens"] - s["packed_tokens"] == sum(len(e["prompt_ids"]) - 1 for e in examples) + repeated


def window_examples(n, seed):
    """Pairs whose prompts and responses run several times the tiny FAMILIES models' windows (4-6 positions), so
    that every branch starts beyond the window: branch tokens see only the prompt's last tokens, or none of it."""
    return random_examples(n, seed, max_prompt=20, max_resp=16)


@pytest.mark.parametrize("arch", FAMILIES)
def test_families_packed_logps_and_grads_equal_unshared(arch):
    # Sliding windows that bite (layers with and without one in one row), Gemma 2's soft-capping, gpt-oss's sinks.
    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    examples = window_examples(9, seed=len(arch))
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    assert batch[PACKED_KEY]["layout"]["max_doc_span"] > 4 * (getattr(model.config, "sliding_window", None) or 3)
    assert_packed_equals_alone(model, batch, examples)


def test_lfm2_moe_packed_logps_and_grads_equal_unshared():
    # LFM2's MoE variant: the same short convolutions (its own layer class) between attention and expert layers.
    model = tiny_model("lfm2_moe", vocab_size=VOCAB, seed=1)
    examples = window_examples(8, seed=4)
    assert_packed_equals_alone(model, PrefixPackingCollator(pad_token_id=0)(examples), examples)


@pytest.mark.parametrize("arch", ["lfm2", "lfm2_moe"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_short_convs_get_the_layout_from_a_decoder_layer_that_keeps_its_keywords(monkeypatch, arch, checkpointing):
    # Some transformers releases' LFM2 decoder layers call their convolution with only the hidden states, the cache
    # and the mask: the layout must still reach it (else the row runs as one sequence, each branch reading the one
    # before it), under gradient checkpointing's recomputation too, and in a deep copy of the packed model.
    import importlib

    module = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    conv_class = getattr(module, "Lfm2MoeShortConv" if arch == "lfm2_moe" else "Lfm2ShortConv")
    kept = ("hidden_states", "past_key_values", "cache", "attention_mask")
    monkeypatch.setattr(conv_class, "__call__", lambda self, *a, **kw: torch.nn.Module.__call__(
        self, *a, **{k: v for k, v in kw.items() if k in kept}))
    model = tiny_model(arch, vocab_size=VOCAB, seed=1)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
    examples = window_examples(6, seed=5)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    pm = copy.deepcopy(packed_model(model, "reference"))
    got = packed_logps(pm, batch)
    want = unshared_logps(model, examples)
    assert rel(got, want) < 1e-5, (got, want)
    ref = want.detach() + torch.randn_like(want)
    for a, b in zip(grads(pm, dpo_loss(got, ref)), grads(model, dpo_loss(want, ref))):
        assert rel(a, b) < 1e-4


def test_short_convs_keep_the_forwards_set_on_their_layers():
    # accelerate's device hooks (device_map="auto" puts them on the decoder layers) replace the layers' instance
    # forwards: the packed model must still go through them. (A hook on a short convolution itself is not run by a
    # packed call, which computes the convolution from the module's weights: offloading LFM2 is not supported.)
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    model = tiny_model("lfm2", vocab_size=VOCAB, seed=1)
    for layer in model.model.layers:
        add_hook_to_module(layer, Count())
    examples = window_examples(3, seed=2)
    pm = packed_model(model, "reference")
    Count.calls = 0
    got = packed_logps(pm, PrefixPackingCollator(pad_token_id=0)(examples))
    assert Count.calls == len(model.model.layers)
    assert rel(got, unshared_logps(model, examples)) < 1e-5


def test_a_layer_the_layout_does_not_reach_is_refused(monkeypatch):
    # A transformers release whose attention modules do not pass their keyword arguments on to the attention
    # function: the packed row must not silently run as one causal sequence.
    from transformers.models.llama.modeling_llama import LlamaAttention

    from prefixdpo.modeling.attention import packed_row

    model = tiny_model("llama", vocab_size=VOCAB, seed=1)
    examples = window_examples(3, seed=1)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    pm = packed_model(model, "reference")
    packed_logps(pm, batch)  # fine as transformers is
    original = LlamaAttention.forward
    monkeypatch.setattr(LlamaAttention, "forward", lambda self, hidden_states, position_embeddings, attention_mask,
                        **kw: original(self, hidden_states, position_embeddings, attention_mask))
    with pytest.raises(RuntimeError, match="LlamaAttention ran inside a packed row without its prefix_layout"):
        packed_logps(pm, batch)
    monkeypatch.undo()
    # The same for a short convolution called without one inside a packed row; outside one it is the layer's own.
    from prefixdpo.modeling.recurrent import install_short_convs

    conv = tiny_model("lfm2", vocab_size=VOCAB, seed=1)
    install_short_convs(conv)
    layer = conv.model.layers[0].conv
    x = torch.randn(1, 5, conv.config.hidden_size)
    assert layer(x).shape == x.shape
    with packed_row(), pytest.raises(RuntimeError, match="ran inside a packed row without its prefix_layout"):
        layer(x)
    # Per thread: another thread's call while this one runs a packed row is an ordinary unpacked call.
    import threading

    seen = []
    with packed_row():
        worker = threading.Thread(target=lambda: seen.append(layer(x).shape))
        worker.start()
        worker.join()
    assert seen == [x.shape]


@pytest.mark.parametrize("arch", FAMILIES)
def test_families_deduplicated_row_equals_each_pair_alone(arch):
    model = tiny_model(arch, vocab_size=VOCAB, seed=2)
    examples = examples_sharing_responses(seed=len(arch) + 1, max_prompt=14, max_resp=12)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    assert_packed_equals_alone(model, batch, examples)


@pytest.mark.parametrize("arch", FAMILIES)
def test_families_on_the_triton_backend(arch):
    # The Triton kernels in the interpreter, fp32 (head dim 16: the kernels take 16..128).
    model = tiny_model(arch, vocab_size=VOCAB, seed=3, head_dim=16)
    examples = window_examples(5, seed=len(arch) + 2)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    assert_packed_equals_alone(model, batch, examples, backend="triton")


@pytest.mark.parametrize("arch", FAMILIES)
def test_families_on_the_flex_backend(arch):
    # FlexAttention has no backward on the CPU: log-probs only (gradients: tests/gpu).
    model = tiny_model(arch, vocab_size=VOCAB, seed=4)
    examples = window_examples(6, seed=len(arch) + 3)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    with torch.no_grad():
        got = packed_logps(packed_model(model, "flex"), batch)
        want = unshared_logps(model, examples)
    assert rel(got, want) < 1e-5, (got, want)


def test_a_window_that_cuts_nothing_reads_the_unwindowed_tables():
    examples = random_examples(3, seed=5)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    wide = tiny_model("mistral", vocab_size=VOCAB, seed=4, sliding_window=64)
    pm = packed_model(wide)
    assert rel(packed_logps(pm, batch), unshared_logps(wide, examples)) < 1e-5
    layout = batch[PACKED_KEY]["_layout"]
    assert layout.max_doc_span <= 64 and not any(isinstance(k, tuple) and k[0] == "dense" for k in layout.cached_keys())


def test_chunked_attention_model_is_refused():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama4_text", vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                               attention_chunk_size=8)
    with pytest.raises(UnsupportedModelError, match="chunked attention"):
        check_config_supported(cfg)


def test_only_response_positions_reach_the_lm_head(monkeypatch):
    # The LM head sees only the positions that predict response tokens (TRL's chunked head on shift_labels), never
    # the whole row: no [T, vocab] logits. TRL takes that compact path on CUDA/XPU; on the CPU it scores every
    # position (in chunks), so the test makes TRL take its CUDA decision here.
    import trl.trainer.utils as tu

    monkeypatch.setattr(tu, "_use_triton", lambda device: True)
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    examples = random_examples(4, seed=3, max_prompt=30, max_resp=3)
    batch = PrefixPackingCollator(pad_token_id=0)(examples)
    pm = packed_model(model)
    rows = []
    original = tu._ChunkedLogProbFunction.apply
    monkeypatch.setattr(tu._ChunkedLogProbFunction, "apply", lambda h, *a: rows.append(h.shape[0]) or original(h, *a))
    packed_logps(pm, batch)
    # Every distinct response once (pair 1 has chosen == rejected: one branch).
    n_targets = sum(len(e["chosen_ids"]) + len(e["rejected_ids"]) * (e["rejected_ids"] != e["chosen_ids"])
                    for e in examples)
    assert rows == [n_targets] and n_targets < batch[PACKED_KEY]["stats"]["packed_tokens"]


def test_plain_calls_and_generate_use_the_original_attention_after_packed_calls():
    model = tiny_model("llama", vocab_size=VOCAB, seed=0)
    pm = packed_model(model)
    batch = PrefixPackingCollator(pad_token_id=0)(random_examples(3, seed=1))
    packed_logps(pm, batch)
    assert pm.config._attn_implementation == "prefix_attn"
    ids = torch.tensor([[5, 6, 7, 8], [0, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])  # padded batch: needs a real attention mask
    assert torch.allclose(pm(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
    assert pm.config._attn_implementation == "sdpa"
    out = pm.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 7)
    packed_logps(pm, batch)  # and back
    assert pm.config._attn_implementation == "prefix_attn"
