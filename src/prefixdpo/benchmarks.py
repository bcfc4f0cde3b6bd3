"""The set-up the benchmark scripts share (scripts/bench_e2e.py, bench_scale.py, bench_multi_gpu.py, profile_step.py,
bench_fp8_reference.py, bench_attention.py, ncu_attention.py): attention layouts and kernel config variants, model
shapes, synthetic preference data of public datasets' shapes with an offline
tokenizer, the bf16 matmul rate a run is measured against, a step timer, and CSV rows with the GPU, versions, date and
command. Nothing here runs in training."""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import itertools
import math
import os
import random
import sys
import time

import torch

# Layouts: name -> (prompt length P, response lengths[, (query heads, KV heads)]). A document is prefix P-1 + branches
# 1+R each (the last prompt token opens each branch); documents are repeated until the next one would exceed the row's
# token budget. Without heads, --heads / --kv-heads apply.
LAYOUTS = {
    "p2048_r256x2": (2048, [256, 256]),
    "p128_r768x2": (128, [768, 768]),
    "p512_r128x8": (512, [128] * 8),
    "p1024_r64x2": (1024, [64, 64]),
    "p300_r256x2": (300, [256, 256]),  # 20 documents in a 16K row: many small documents for the table build
    "p700_r300x2_g7": (700, [300, 300], (28, 4)),  # Qwen2.5-7B heads: a GQA group of 7
    # long prompts (one document per 16K row from 8K on), where auto may route a row to the sdpa backend
    "p4096_r512x2": (4096, [512, 512]),
    "p8192_r512x2": (8192, [512, 512]),
    "p16000_r512x2": (16000, [512, 512]),
}


def layout_heads(name: str, args) -> tuple[int, int]:
    spec = LAYOUTS[name]
    return spec[2] if len(spec) > 2 else (args.heads, args.kv_heads)


def triton_attention_calls(q, k, v, do, layout, cfg):
    """The `triton` backend's forward (no autograd) and forward+backward (out, dq, dk, dv) of one row at ``cfg``: the
    two callables the attention benchmarks time."""
    from prefix_attn import triton as ta

    def fwd():
        with torch.no_grad():
            return ta.triton_prefix_attention(q, k, v, layout, config=cfg)

    def step():
        o = ta.triton_prefix_attention(q, k, v, layout, config=cfg)
        return (o, *torch.autograd.grad(o, (q, k, v), do))

    return fwd, step


def make_layout(name: str, tokens: int, device):
    from prefix_attn import PrefixLayout

    P, resp = LAYOUTS[name][:2]
    doc = (P - 1) + sum(1 + r for r in resp)
    n = max(1, tokens // doc)
    return PrefixLayout.from_lengths([P - 1] * n, [[1 + r for r in resp]] * n, device=device)


# Config variants timed by --sweep: name -> fields replaced on the default config (``default_config`` for a GQA group of
# 4: forward 16 tokens x 64 keys, 4 warps, 3 stages, TMA; KV-major 64 queries x 64 keys, 4 warps, 2 stages; dq 16
# tokens x 64 keys, 4 warps, 2 stages). *_block_m of the forward and dq kernels count TOKENS: the MMA has
# block_m x (Hq / Hkv) rows. The comments say what each is predicted to move (scripts/check_sm90_compile.py shows the
# compiles: registers, spills, shared memory).
SWEEP_VARIANTS = {
    "default": {},
    # 32 tokens x 4 heads = 128 rows over 2 warpgroups
    "fwd_pack32_merged_w8": dict(fwd_block_m=32, fwd_warps=8),
    # 128-key tiles: half the loop iterations per key; 160 KB of shared memory, so one 8-warp CTA per SM (as FA3)
    "fwd_pack32_merged_n128_w8_s2": dict(fwd_block_m=32, fwd_block_n=128, fwd_warps=8, fwd_stages=2),
    # 128-key tiles on one warpgroup: half the acc rescales per key, where walks are long (long prefixes); 144 KB of
    # shared memory, one program per SM
    "fwd_n128_s2": dict(fwd_block_n=128, fwd_stages=2),
    # backward: 32-query steps of the KV-major kernel spill less (255 regs either way), 3 stages. The backward
    # variants are of the plain-Triton kernels, so they turn the Gluon ones off.
    "bwd_kv32_s3": dict(kv_block_m=32, kv_stages=3, bwd_gluon=False),
    # 32-key forward tiles: 3 stages in 64 KB of shared memory, so 3 programs per SM instead of 2 (more softmax/MMA
    # overlap between programs, the one kind of overlap Triton 3.6 gives on Hopper without warp specialization)
    "doc_order_pack16_merged_n32": dict(fwd_block_n=32),
    "all_pack32_w8": dict(fwd_block_m=32, fwd_warps=8, kv_block_m=32, kv_stages=3, bwd_gluon=False),
    # the backward before: 128-key KV programs and 128-row dq programs of two warpgroups each, one program per SM
    # (the default's one-warpgroup programs fit two per SM, so one program's softmax runs under the other's MMAs)
    "bwd_kv128_w8_dq32_w8": dict(kv_block_n=128, kv_warps=8, dq_block_m=32, dq_warps=8, bwd_gluon=False),
    # 3 stages of q/dO: more shared memory, one KV program per SM again
    "bwd_kv_s3": dict(kv_stages=3, bwd_gluon=False),
    # GQA groups of 5-8 (--heads 28 --kv-heads 4), the tiles before: 16 tokens x the group over two warpgroups,
    # where the default's 64 // group tokens make the packed forward and dq programs 64 rows of one warpgroup
    "g8_before": dict(fwd_block_m=16, fwd_warps=8, dq_block_m=16, dq_warps=8),
    # the backward's plain-Triton KV-major and dq kernels, where the default runs their Gluon versions on Hopper
    # (prefix_attn/triton/backward_gluon.py)
    "bwd_plain": dict(bwd_gluon=False),
}


SHAPES = {  # name: (median total tokens, median prompt:completion ratio)
    "hh-rlhf": (186, 2.15),
    "capybara": (1160, 1.59),
    "metamath-dpo": (872, 3.91),
    "tldr": (416, 11.14),
    "tulu-helpsteer": (775, 6.34),
    "ultrafeedback": (409, 0.42),
}
# Shapes with several completions per prompt and every pair of them: name -> (lengths of, completions per prompt).
ALL_PAIRS_SHAPES = {"ultrafeedback-allpairs": ("ultrafeedback", 4)}
# Image shapes: name -> (lengths of, (min, max) images per prompt, image side in pixels: 896 = 32 x 28, 1024 tokens).
VISION_SHAPES = {"ultrafeedback-vlm": ("ultrafeedback", (1, 2), 896)}
MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=8192),
    # Llama-3-8B: 8.0B parameters; 16 GB of bf16 weights, so a full fine-tune with AdamW states and a separate
    # reference copy (~80 GB before activations) fits a 141 GB H200 but not an 80 GB GPU: there, --lora (the
    # reference is the base, adapters off) or a smaller optimizer (bench_scale.py --optim adafactor).
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0,
                     max_position_embeddings=8192),
}
# Qwen2.5-VL-3B-Instruct's shapes (text: 36 layers of 2048; vision: 32 blocks of 1280, windows of 112 pixels).
VLM_MODELS = {
    "qwen2.5-vl-3b": dict(
        text_config=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                         max_position_embeddings=128000,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", in_channels=3,
                           tokens_per_second=2),
    ),
}
WORDS = 30000
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<eos>"] + [f"w{i}" for i in range(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def make_data(shape: str, n: int, seed: int, sigma: float = 0.5):
    """``n`` pairs of the shape (an all-pairs shape: whole prompts, so up to a prompt's pairs more)."""
    lengths_of, completions = ALL_PAIRS_SHAPES.get(shape, (shape, 2))
    total, ratio = SHAPES[lengths_of]
    p_med, c_med = total * ratio / (1 + ratio), total / (1 + ratio)
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(WORDS)}" for _ in range(k))  # noqa: E731
    draw = lambda med: max(1, int(round(med * math.exp(rng.gauss(0, sigma)))))  # noqa: E731
    data = []
    while len(data) < n:
        prompt = words(draw(p_med))
        responses = [" " + words(draw(c_med)) for _ in range(completions)]  # ranked best first
        data += [{"prompt": prompt, "chosen": responses[a], "rejected": responses[b]}
                 for a, b in itertools.combinations(range(completions), 2)]
    return data


def make_vlm_processor():
    """A Qwen2.5-VL processor over the word-level tokenizer (its vision tokens added) with a chat template that puts
    each image's placeholder before the user's text."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    tok = make_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": VISION_TOKENS})
    template = (
        "{% for m in messages %}{{ m['role'] }}: {% if m['content'] is string %}{{ m['content'] }} {% else %}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> "
        "{% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endif %}{% if m['role'] != 'user' %}<eos> {% endif %}"
        "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    tok.add_tokens(["user:", "assistant:"])
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=1024 * 28 * 28, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    try:
        from transformers import Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(image_processor=images, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                                   chat_template=template)
    except ImportError:  # no torchvision (a CPU dry run): images need no video processor

        class ImageOnlyProcessor(Qwen2_5_VLProcessor):
            def check_argument_for_proper_class(self, argument_name, argument):
                if argument_name != "video_processor" or argument is not None:
                    return super().check_argument_for_proper_class(argument_name, argument)

        return ImageOnlyProcessor(image_processor=images, tokenizer=tok, video_processor=None, chat_template=template)


def make_vlm_model(name: str, processor, device):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    config = Qwen2_5_VLConfig(**VLM_MODELS[name], image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"])
    with torch.device(device):
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")


def make_vlm_data(shape: str, n: int, seed: int):
    """``n`` conversational image pairs: ``make_data``'s texts, each prompt with its images (smooth random images:
    low-resolution noise scaled up, so they stay small in memory and on disk)."""
    from PIL import Image

    lengths_of, (lo, hi), side = VISION_SHAPES[shape]
    rng = random.Random(seed)
    out = []
    for d in make_data(lengths_of, n, seed):
        images = []
        for _ in range(rng.randint(lo, hi)):
            noise = bytes(rng.randrange(256) for _ in range(16 * 16 * 3))
            images.append(Image.frombytes("RGB", (16, 16), noise).resize((side, side), Image.BILINEAR))
        out.append({"images": images, "prompt": [{"role": "user", "content": d["prompt"]}],
                    "chosen": [{"role": "assistant", "content": d["chosen"].strip()}],
                    "rejected": [{"role": "assistant", "content": d["rejected"].strip()}]})
    return out


def vlm_unique_tokens_per_pair(data, processor) -> tuple[float, list[dict]]:
    """Tokens per pair counted once each (every prompt with its image tokens, every distinct response), and the
    measured pairs (``prefixdpo.data.vision.measure_vision_pairs``)."""
    from prefixdpo.data.vision import measure_vision_pairs

    pairs = measure_vision_pairs(data, processor)
    prompts = {p["prefix_key"]: len(p["prompt_ids"]) for p in pairs}
    responses = {(p["prefix_key"], tuple(p[k])) for p in pairs for k in ("chosen_ids", "rejected_ids")}
    return (sum(prompts.values()) + sum(len(r) for _, r in responses)) / len(pairs), pairs


def unique_tokens_per_pair(data, tok) -> float:
    """Tokens of the data counted once each (every prompt, every distinct response to it, +1 eos per response), per
    pair: what a pair costs when nothing is run twice."""
    prompts = {d["prompt"] for d in data}
    responses = {(d["prompt"], d[k]) for d in data for k in ("chosen", "rejected")}
    count = lambda text: len(tok(text)["input_ids"])  # noqa: E731
    return (sum(map(count, prompts)) + sum(count(r) + 1 for _, r in responses)) / len(data)


def matmul_tflops():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * 20 / (time.perf_counter() - t) / 1e12


def matmul_params(model):
    emb = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return n - emb + (emb if tied else 0)  # the LM head multiplies activations even when tied to the embedding


class StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class CB(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                torch.cuda.synchronize()
                timer.times.append(time.perf_counter())

        self.times = []
        self.callback = CB()


TRAINER_OPTIONS = ("fp8ref", "nogc", "reentrant", "nonreentrant", "liger", "refgraph", "polgraph", "graphs", "compile",
                   "rcompile")


def build_trainer(name: str, model, ref, data: list[dict], tok, common: dict, peft_config=None, callbacks=None,
                  budget: int | None = None):
    """A trainer as a benchmark names it: ``trl`` or ``ours-<backend>`` (triton, fa4, flex, reference), options after
    ``+`` (scripts/bench_e2e.py's docstring lists them), ``budget``: token-budget batching with that many packed tokens
    per micro-batch. ``common``: the DPOConfig fields both trainers share."""
    from datasets import Dataset

    common = dict(common)
    opts = name.split("@")[0].split("+")[1:]
    unknown = set(opts) - set(TRAINER_OPTIONS)
    if unknown:
        raise ValueError(f"unknown trainer option(s) {sorted(unknown)}; known: {TRAINER_OPTIONS}")
    if "nogc" in opts:
        common["gradient_checkpointing"] = False
    if "reentrant" in opts:  # checkpointing's reentrant kind (PrefixDPOConfig's default; TRL's is non-reentrant)
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": True}
    if "nonreentrant" in opts:
        common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    if "liger" in opts:
        # Liger-Kernel's RMSNorm, RoPE and SwiGLU (TrainingArguments.use_liger_kernel; TRL keeps its own log-prob
        # head). Liger replaces transformers' Llama classes module-wide: run it inside llama_module_restored().
        common["use_liger_kernel"] = True
    if "compile" in opts or "rcompile" in opts:
        common["torch_compile"] = True
    # rcompile: accelerate's regional compilation (each decoder layer compiled on its own, the checkpointed
    # recomputation inside the compiled graph) instead of Trainer's whole-model torch.compile. accelerate reads the
    # switch from the environment when the trainer builds its accelerator.
    os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1" if "rcompile" in opts else "0"
    if name.split("+")[0] == "trl":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=ref, args=DPOConfig(**common), peft_config=peft_config,
                             train_dataset=Dataset.from_list(data), processing_class=tok, callbacks=callbacks)
    else:
        from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

        backend = name.split("-", 1)[1].split("@")[0].split("+")[0]  # "triton", "flex", "reference"
        extra = dict(batching="token_budget", max_tokens_per_batch=budget) if budget else {}
        if "fp8ref" in opts:  # the reference model's attention in FP8
            extra["ref_attn_backend"] = "triton_fp8"
        if "refgraph" in opts or "graphs" in opts:  # the reference backbone as CUDA graphs (rows up to 4096 tokens)
            extra["ref_cuda_graphs"] = True
        if "polgraph" in opts or "graphs" in opts:  # the policy's checkpointed forward as CUDA graphs
            extra["policy_cuda_graphs"] = True
        trainer = PrefixDPOTrainer(model=model, ref_model=ref, peft_config=peft_config,
                                   args=PrefixDPOConfig(attn_backend=backend, **extra, **common),
                                   train_dataset=Dataset.from_list(data), processing_class=tok,
                                   callbacks=callbacks)
    return trainer


def reference_and_adapters(model, lora: int):
    """(reference model, peft config) of a benchmark run: a frozen copy of ``model`` for a full fine-tune; with LoRA of
    rank ``lora`` on every linear layer, no copy (both trainers take the reference from the base, adapters off)."""
    if not lora:
        return copy.deepcopy(model).eval().requires_grad_(False), None
    from peft import LoraConfig

    return None, LoraConfig(r=lora, lora_alpha=2 * lora, lora_dropout=0.0, task_type="CAUSAL_LM",
                            target_modules="all-linear")


@contextlib.contextmanager
def llama_module_restored():
    """Within the block a run may let Liger replace transformers' Llama classes and rotary function module-wide (the
    ``liger`` option); after it they are put back, so that later runs without the option are not changed."""
    from transformers.models.llama import modeling_llama

    saved = dict(vars(modeling_llama))
    try:
        yield
    finally:
        for key, value in saved.items():
            setattr(modeling_llama, key, value)


def run_metadata() -> dict:
    """The GPU, versions, date and command of this run, for every CSV row."""
    meta = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "command": " ".join(["python"] + sys.argv)}
    for name in ("transformers", "trl", "triton"):
        try:
            meta[name] = __import__(name).__version__
        except ImportError:
            pass
    return meta


def append_csv(path: str, row: dict) -> None:
    """Append ``row`` to the CSV at ``path`` (header first if new): a row at a time, so a run cut short keeps what it
    measured. Where ``path`` holds a header of other columns (an older version of the script), the row goes to
    ``<path stem>.<n>.csv``, the first such file that is new or has this row's columns, and a line says so."""
    stem, n = path[:-4] if path.endswith(".csv") else path, 0
    while os.path.exists(path) and os.path.getsize(path):
        with open(path, newline="") as f:
            if next(csv.reader(f), []) == list(row):
                break
        n += 1
        path = f"{stem}.{n}.csv"
    if n:
        print(f"CSV with other columns at {stem}.csv: this row goes to {path}", flush=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if f.tell() == 0:
            w.writeheader()
        w.writerow(row)


def compile_sm90(fn, types, consts, num_warps, num_stages, gluon=False):
    """Compile the Triton kernel ``fn`` (a Gluon kernel with ``gluon``) for Hopper (sm_90a) without a GPU. ``types``:
    arg name -> signature type (constexprs are filled in from ``consts``); pointers and strides are marked
    16-divisible and ``T`` not, as the runtime specializes them (scripts/check_sm90_compile.py)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        else:
            sig[name] = types[name]
            if (sig[name].startswith("*") or name.startswith("stride")) and name != "T":
                attrs[(i,)] = [["tt.divisibility", 16]]
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource

        src = GluonASTSource(fn, sig, consts, attrs)
    else:
        src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    opts = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def ptxas_stats(ptx: str):
    """(registers, spill store bytes, spill load bytes, ptxas's output if it failed, whether it reports C7514) of
    ``ptx`` assembled for sm_90a by the ptxas Triton itself uses there."""
    import re
    import subprocess
    import tempfile

    import triton

    try:  # newer Triton bundles two ptxas and picks one per architecture (the older one rejects its PTX version)
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            ptxas = get_ptxas(90).path
        except TypeError:  # Triton releases whose get_ptxas takes no architecture
            ptxas = get_ptxas().path
    except ImportError:
        ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "k.ptx")
        with open(p, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-arch=sm_90a", "-v", p, "-o", os.path.join(d, "k.cubin")], capture_output=True,
                           text=True)
    out = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill_st = re.search(r"(\d+) bytes spill stores", out)
    spill_ld = re.search(r"(\d+) bytes spill loads", out)
    return (int(regs.group(1)) if regs else -1, int(spill_st.group(1)) if spill_st else -1,
            int(spill_ld.group(1)) if spill_ld else -1, out if r.returncode else "", "C7514" in out)
