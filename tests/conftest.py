"""Shared test fixtures: an offline word-level tokenizer, random preference data (one pair per prompt, or every pair of
a few responses per prompt), tiny models of real architectures; random prefix layouts and the FP8 quantization check
that the CPU and GPU kernel tests share."""

from __future__ import annotations

import os
import random
import shutil

# Without an NVIDIA GPU, Triton kernels run in its interpreter. TRITON_INTERPRET must be set before triton is first
# imported anywhere in the process (trl and transformers import it), or triton's own @jit helpers are compiled-mode
# functions that an interpreted kernel cannot call. Hence here, before any other import.
if not (os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

VOCAB_WORDS = 120


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package: the tests load them by path)."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<bos>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(VOCAB_WORDS)] + ["User:", "Assistant:"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                eos_token="<eos>")
    t.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }} {% else %}Assistant: "
        "{{ m['content'] }} <eos> {% endif %}{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
    )
    return t


def random_words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(VOCAB_WORDS)}" for _ in range(n))


def make_pairs(n: int, seed: int = 0, prompt=(1, 12), response=(0, 8), identical_every: int = 0):
    """Random standard-format pairs; prompt/response lengths drawn from the given inclusive ranges (in words); chosen
    and rejected differ unless ``identical_every`` asks for identical ones.

    A response of 0 words still has TRL's appended eos, so each response has >= 1 token."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p = random_words(rng, rng.randint(*prompt))
        c = random_words(rng, rng.randint(*response))
        if identical_every and i % identical_every == 0:
            r = c
        else:  # distinct responses unless asked for identical ones (the trainer drops those, TRL would train them)
            r = random_words(rng, rng.randint(*response))
            while r == c:
                r = random_words(rng, rng.randint(*response))
        rows.append({"prompt": p, "chosen": (" " + c) if c else "", "rejected": (" " + r) if r else ""})
    return rows


def make_all_pairs(prompts: int = 2, responses: int = 4, seed: int = 0, prompt=(20, 20), response=(3, 8),
                   shared_start: int = 0):
    """Standard-format pairs with several per prompt, as UltraFeedback's completions turned into every pair: each
    prompt has ``responses`` responses (ranked in list order) and all ``responses * (responses - 1) / 2`` pairs, the
    better one chosen, grouped by prompt. ``shared_start``: words every response of a prompt begins with (so a
    truncation that cuts after them makes the responses equal)."""
    import itertools

    rng = random.Random(seed)
    rows = []
    for _ in range(prompts):
        p = random_words(rng, rng.randint(*prompt))
        start = random_words(rng, shared_start) + " " if shared_start else ""
        rs = [" " + start + random_words(rng, rng.randint(*response)) for _ in range(responses)]
        rows += [{"prompt": p, "chosen": rs[a], "rejected": rs[b]}
                 for a, b in itertools.combinations(range(responses), 2)]
    return rows


ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma", "phi3")


def tiny_config(arch: str, vocab_size: int, **overrides):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    extra = {
        "llama": {},
        "qwen2": {},
        "qwen3": {"head_dim": 8},
        "mistral": {"sliding_window": None},
        "gemma": {"head_dim": 8},
        "phi3": {"sliding_window": None, "pad_token_id": 0},
        "granite": {},  # not in ARCHS: a backbone that scales its embeddings between the embedding and the layers
        # The families of FAMILIES: attention options on (windows that bite on short rows, Gemma 2's soft-cap,
        # gpt-oss's sinks), layers with and without a window in one model.
        "gemma2": {"head_dim": 8, "num_hidden_layers": 3, "sliding_window": 6, "attn_logit_softcapping": 2.0,
                   "final_logit_softcapping": 30.0, "query_pre_attn_scalar": 8,
                   "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
        "gemma3_text": {"head_dim": 8, "num_hidden_layers": 3, "sliding_window": 5, "query_pre_attn_scalar": 8,
                        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]},
        "gpt_oss": {"head_dim": 8, "num_hidden_layers": 2, "sliding_window": 4, "num_local_experts": 4,
                    "num_experts_per_tok": 2, "layer_types": ["sliding_attention", "full_attention"]},
        "mistral_window": {"sliding_window": 5},
        # A hybrid: short convolution layers (kernel 3) around an attention layer.
        "lfm2": {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"], "conv_L_cache": 3,
                 "conv_bias": True, "block_auto_adjust_ff_dim": False},
        "lfm2_moe": {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"], "num_experts": 4,
                     "num_experts_per_tok": 2, "num_dense_layers": 1, "moe_intermediate_size": 16},
    }[arch]
    arch = "mistral" if arch == "mistral_window" else arch
    kw = {**common, **extra, **overrides}
    return AutoConfig.for_model(arch, **kw)


# Models beyond plain causal attention that prefix sharing honours: sliding windows (gemma2, gemma3_text, gpt_oss, and
# a Mistral config with one), Gemma 2's logit soft-capping, gpt-oss's attention sinks, LFM2's short convolutions.
FAMILIES = ("gemma2", "gemma3_text", "gpt_oss", "mistral_window", "lfm2")


def tiny_model(arch: str = "llama", vocab_size: int | None = None, seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import AutoModelForCausalLM

    vocab_size = vocab_size or (VOCAB_WORDS + 6)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, vocab_size, **overrides)
    # Gemma 2 and gpt-oss have no SDPA path (soft-capping, sinks): their eager attention is the truth.
    attn = "eager" if cfg.model_type in ("gemma2", "gpt_oss") else "sdpa"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=dtype)
    with torch.no_grad():
        if cfg.model_type == "gpt_oss":  # the sinks start at zero: make them matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 1.0)
        if cfg.model_type == "gemma2":  # scores of a few units, so that the soft-cap bites
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(10.0)
                layer.self_attn.k_proj.weight.mul_(10.0)
    return model


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny Llama-shaped model and its tokenizer saved to disk (the quickstart's), as a user's local model."""
    from prefixdpo.quickstart import build_model, build_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    tok = build_tokenizer()
    tok.save_pretrained(path)
    build_model(tok).save_pretrained(path)
    return str(path)


def dir_digest(path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``path`` (to show a directory did not change)."""
    import hashlib
    from pathlib import Path

    root = Path(path)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def random_layout(rng: random.Random, tokens: int, device):
    """A row of at least ``tokens`` tokens of documents with awkward lengths: empty and 1-token prefixes, prefixes
    past one tile, 1..8 branches of 1 token, of one tile +-1, and longer."""
    from prefix_attn import PrefixLayout

    prefix, branches, total = [], [], 0
    while total < tokens:
        p = rng.choice([0, 1, rng.randint(1, 300), rng.randint(100, 1200)])
        nb = rng.choice([1, 2, 2, 3, 8])
        bl = [rng.choice([1, rng.randint(1, 64), rng.randint(60, 400), 127, 128, 129]) for _ in range(nb)]
        prefix.append(p)
        branches.append(bl)
        total += p + sum(bl)
    return PrefixLayout.from_lengths(prefix, branches, device=device)


def random_options(rng: random.Random) -> dict:
    """Attention options for the random-layout harness: a sliding window (none; 1; shorter than a tile; gpt-oss's
    128; about a tile and a half; Gemma 3's 1024, longer than most documents), a logit soft-cap (none, biting, Gemma
    2's 50) and sinks (half the time), each drawn on its own."""
    return {"window": rng.choice([None, None, 1, 37, 128, 200, 1024]), "softcap": rng.choice([None, None, 2.0, 50.0]),
            "sinks": rng.random() < 0.5}


def assert_quantized_as_reference(got8, got_s, src, block: int, rotate: bool):
    """The fused quantize kernel's e4m3 values ``got8`` and scales ``got_s`` against ``fp8_reference``'s for ``src``:
    bit for bit (but +-0) without rotation; with it, the fp32 sums of the rotation may be ordered differently, so
    scales to the fp32 rounding of a d-term sum and values to one e4m3 step (2^-3 of the value, or the subnormal step
    2^-9) at rounding boundaries, on at most 0.1% of the elements."""
    from prefix_attn import fp8_reference as fr

    ref8, ref_s = fr.quantize_reference(src, block, rotate)
    if not rotate:
        assert torch.equal(got_s, ref_s)
        assert torch.equal(got8.float(), ref8.float())
        return
    torch.testing.assert_close(got_s, ref_s, rtol=32 * torch.finfo(torch.float32).eps, atol=0)
    a, b = got8.float(), ref8.float()
    step = torch.maximum(b.abs() * 2.0**-3, torch.full_like(b, 2.0**-9))
    assert ((a - b).abs() <= step).all()
    assert (a != b).float().mean() <= 1e-3
