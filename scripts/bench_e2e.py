"""End-to-end DPO throughput: trl.DPOTrainer vs PrefixDPOTrainer (triton and flex backends) on one GPU.

A random-init model of a real architecture's shapes (default: Llama-3.2-1B), synthetic preference data whose lengths
follow public datasets' shapes (the prefix-sharing paper's per-dataset median total length and median
prompt:completion ratio, log-normal spread around the medians), the same precision (bf16), gradient checkpointing
(TRL's default; each trainer's own default kind: TRL's non-reentrant, ours reentrant), live reference model and pairs
per step for every trainer. Prints pairs/s, unique tokens/s (prompt
+ both responses, counted once), peak memory and MFU, writes a CSV row per (trainer, dataset) and a PNG bar chart.
Speed-ups compare like with like: a trainer with Liger over ``trl+liger``, one without over ``trl``.

MFU counts 8 * N FLOPs per unique token (policy forward + backward 6N, reference forward 2N; N = parameters that
multiply activations: every linear layer and the LM head, not the embedding lookup), over the bf16 matmul rate
measured at the start of the run. Attention FLOPs are left out of the numerator, so MFU is conservative.

With ``--lora R`` (the 8B shape needs it on an 80 GB GPU) both trainers train rank-R adapters on every linear layer
and take the reference forward from the base model with the adapters off; MFU then counts 6 * N (the backward
computes input gradients only).

    python scripts/bench_e2e.py --out $OUT            # all six shapes, trl + ours(triton) + ours(flex)

``ultrafeedback-allpairs`` (not in the default set): UltraFeedback's lengths with 4 completions per prompt and all 6
pairs of them, laid out prompt by prompt, as openbmb/UltraFeedback becomes with ``pairs_from_ranks: all``. TRL runs
every pair on its own; ours groups the pairs of a prompt into micro-batches (``group_by_prompt: auto``) and runs the
prompt and each completion once per micro-batch. Unique tokens count each prompt and each completion once.

    python scripts/bench_e2e.py --datasets ultrafeedback ultrafeedback-allpairs --trainers trl ours-triton
    python scripts/bench_e2e.py --dry-run --datasets ultrafeedback-allpairs   # CPU: data, tokens, sharing forecast

Each shape runs the trainers ``--repeat`` times (default 2) in this order and reports the last round only. The first
round fills Triton's caches: TRL's log-prob head and our kernels compile a variant for each new shape class on first
use (seconds each). Measured on an H100: with one round, TRL's HH-RLHF speed was 5-6 pairs/s on a fresh machine and
16-17 on one whose Triton disk cache was warm from an earlier call; and the trainer that ran first paid the compiles
for the ones after it, which share TRL's head.
    python scripts/bench_e2e.py --model llama-8b --lora 16 --datasets capybara hh-rlhf --trainers trl ours-triton

``ultrafeedback-vlm`` (not in the default set; give ``--model qwen2.5-vl-3b``): image preference pairs for a
Qwen2.5-VL-3B-shaped random-init model: UltraFeedback's text lengths, 1 or 2 images per prompt of 896 x 896 pixels
(1024 image tokens each, plus the vision tower's forward and backward). TRL runs every prompt's images twice, ours
once per micro-batch. Unique tokens count image tokens (once per prompt); MFU counts the language model only.

    python scripts/bench_e2e.py --model qwen2.5-vl-3b --datasets ultrafeedback-vlm --trainers trl ours-triton
    python scripts/bench_e2e.py --dry-run --model qwen2.5-vl-3b --datasets ultrafeedback-vlm   # CPU

Trainer names: ``trl``, ``ours-<backend>`` (triton, flex, reference), ``ours-<backend>@<tokens>`` (token-budget
batching), each with options after ``+``: ``fp8ref`` (the reference model's attention in FP8,
``ref_attn_backend="triton_fp8"``), ``nogc`` (no gradient checkpointing; TRL's default has it on), ``reentrant`` /
``nonreentrant`` (the kind of checkpointing: ours defaults to reentrant, TRL to non-reentrant), ``liger``
(``use_liger_kernel=True``: Liger-Kernel's RMSNorm, RoPE and SwiGLU; ours applies them to the reference model too,
TRL to the policy only), ``refgraph`` (ours: ``ref_cuda_graphs=True``), ``polgraph`` (ours:
``policy_cuda_graphs=True``), ``graphs`` (both), ``compile``
(``torch_compile=True``), ``rcompile`` (``torch_compile=True`` with accelerate's regional compilation: each decoder
layer compiled on its own); e.g. ``ours-triton+nogc``, ``trl+nogc``, ``ours-triton+fp8ref@16384``.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

from prefixdpo.benchmarks import (ALL_PAIRS_SHAPES, MODELS, SHAPES, VISION_SHAPES, VLM_MODELS, StepTimer, append_csv,
                                  build_trainer, llama_module_restored, make_data, make_tokenizer, make_vlm_data,
                                  make_vlm_model, make_vlm_processor, matmul_params, matmul_tflops,
                                  reference_and_adapters, run_metadata, unique_tokens_per_pair,
                                  vlm_unique_tokens_per_pair)


def dry_run(args, tok):
    """What can be checked without a GPU: each shape's data, its tokens, and the sharing the packed rows will log (with
    the micro-batches the trainer draws: grouped by prompt where prompts repeat, else TRL's random order)."""
    from prefixdpo import PrefixDPOConfig
    from prefixdpo.data.grouping import prompt_groups, training_micro_batches
    from prefixdpo.data.sharing import predict_sharing

    config = PrefixDPOConfig(output_dir="/tmp/bench_e2e", report_to="none", bf16=False, use_cpu=True,
                             per_device_train_batch_size=args.pairs, max_length=None)
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731  (word-level: TRL's tokenization of these texts)
    for shape in args.datasets:
        if shape in VISION_SHAPES:
            vlm_dry_run(shape, args)
            continue
        data = make_data(shape, args.pairs * (args.steps + args.warmup), seed=0)
        tokenized = [{"prompt_ids": ids(d["prompt"]), "chosen_ids": ids(d["chosen"]) + [tok.eos_token_id],
                      "rejected_ids": ids(d["rejected"]) + [tok.eos_token_id]} for d in data]
        groups = prompt_groups(tokenized)
        batches = training_micro_batches(tokenized, config)
        f = predict_sharing([[tokenized[i] for i in b] for b in batches])
        print(f"{shape:24s} {len(data)} pairs, {len(groups)} prompts, {unique_tokens_per_pair(data, tok):.0f} unique "
              f"tokens/pair; {args.pairs} pairs per micro-batch: tokens_saved_frac {f.tokens_saved_frac:.3f}, "
              f"responses_deduplicated_frac {f.responses_deduplicated_frac:.3f}", flush=True)


def vlm_dry_run(shape, args):
    """An image shape without a GPU: the model built on the meta device, the data measured with the processor, and
    the image tokens and images sharing saves in the trainer's micro-batches."""
    from prefixdpo.data.sharing import predict_sharing
    from prefixdpo.data.vision import image_statistics

    processor = make_vlm_processor()
    model = make_vlm_model(args.model if args.model in VLM_MODELS else "qwen2.5-vl-3b", processor, "meta")
    data = make_vlm_data(shape, args.pairs * (args.steps + args.warmup), seed=0)
    unique, pairs = vlm_unique_tokens_per_pair(data, processor)
    batches = [list(range(i, min(i + args.pairs, len(pairs)))) for i in range(0, len(pairs), args.pairs)]
    f = predict_sharing([[pairs[i] for i in b] for b in batches])
    im = image_statistics(pairs, batches)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"{shape:24s} {type(model).__name__} ({params:.2f}B parameters, meta device); {len(data)} pairs, "
          f"{unique:.0f} unique tokens/pair, {im['image_tokens_trl'] / (2 * len(pairs)):.0f} image tokens/prompt; "
          f"{args.pairs} pairs per micro-batch: tokens_saved_frac {f.tokens_saved_frac:.3f}, image tokens "
          f"{im['image_tokens_trl']} (TRL) -> {im['image_tokens_packed']}, images through the vision tower "
          f"{im['images_trl']} -> {im['images_packed']}", flush=True)


def run_one(trainer_name, shape, args, tok, peak_tflops):
    from transformers import AutoModelForCausalLM, LlamaConfig

    # "ours-triton@16384": token-budget batching with that many packed tokens per micro-batch (pairs per step vary,
    # so pairs/s is counted from the pairs each timed step really took).
    budget = int(trainer_name.split("@")[1]) if "@" in trainer_name else None
    n_data = args.pairs * (args.steps + args.warmup) * (16 if budget else 1)
    torch.manual_seed(0)
    if shape in VISION_SHAPES:
        tok = make_vlm_processor()  # the processing class both trainers get
        data = make_vlm_data(shape, n_data, seed=0)
        unique = vlm_unique_tokens_per_pair(data, tok)[0]
        model = make_vlm_model(args.model, tok, "cuda")
        n_params = matmul_params(model) - sum(p.numel() for p in model.model.visual.parameters())
    else:
        data = make_data(shape, n_data, seed=0)
        unique = unique_tokens_per_pair(data, tok)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(LlamaConfig(**MODELS[args.model]), dtype=torch.bfloat16,
                                                     attn_implementation="sdpa")
        n_params = matmul_params(model)
    ref, peft_config = reference_and_adapters(model, args.lora)
    common = dict(output_dir=os.path.join(args.tmp, f"{trainer_name}-{shape}"), report_to="none", bf16=torch.cuda.is_available(),
                  per_device_train_batch_size=args.pairs, max_steps=args.steps + args.warmup, logging_steps=1,
                  save_strategy="no", gradient_checkpointing=True, max_length=None, disable_tqdm=True,
                  dataloader_num_workers=2)
    timer = StepTimer()
    trainer = build_trainer(trainer_name, model, ref, data, tok, common, peft_config, callbacks=[timer.callback],
                            budget=budget)
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    dt = timer.times[-1] - timer.times[args.warmup - 1]
    if budget:
        pairs = [h["batching/pairs_per_micro_batch"] for h in trainer.state.log_history
                 if "batching/pairs_per_micro_batch" in h][args.warmup:]
        pairs_s = sum(pairs) / dt
    else:
        pairs_s = args.pairs * args.steps / dt
    toks_s = pairs_s * unique
    # FLOPs per unique token: policy forward 2N + backward 4N (2N with LoRA: input gradients only, the frozen
    # weights get none) + reference forward 2N. Recomputation under gradient checkpointing is not credited.
    mfu = toks_s * (6 if args.lora else 8) * n_params / (peak_tflops * 1e12)
    mem = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model, ref
    # The trainer holds reference cycles: without a collection the model stays allocated into the next run, whose
    # peak then starts from it (seen on the 8B shape: three runs in a row reported the same 30.29 GiB).
    gc.collect()
    torch.cuda.empty_cache()
    return {"trainer": trainer_name, "dataset": shape, "pairs_per_s": pairs_s, "unique_tokens_per_s": toks_s,
            "peak_mem_gib": mem, "mfu": mfu, "mean_unique_tokens_per_pair": unique}


def trl_counterpart(trainer: str) -> str:
    """The TRL run a trainer is compared with: TRL with Liger for a trainer with the ``liger`` option, else TRL at
    its defaults."""
    return "trl+liger" if "liger" in trainer.split("@")[0].split("+")[1:] else "trl"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", choices=list(MODELS) + list(VLM_MODELS),
                    help="an image shape (ultrafeedback-vlm) needs a vision-language model (qwen2.5-vl-3b)")
    ap.add_argument("--datasets", nargs="+", default=list(SHAPES),
                    choices=list(SHAPES) + list(ALL_PAIRS_SHAPES) + list(VISION_SHAPES))
    ap.add_argument("--trainers", nargs="+", default=["trl", "ours-triton", "ours-flex"])
    ap.add_argument("--pairs", type=int, default=8, help="pairs per step (per_device_train_batch_size)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2,
                    help="rounds over the trainers per shape; the last is reported (module docstring says why)")
    ap.add_argument("--lora", type=int, default=0, metavar="R",
                    help="LoRA of rank R on every linear layer (both trainers); 0: full fine-tune")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: build each shape's data and print its tokens and the sharing forecast")
    args = ap.parse_args(argv)
    tok = make_tokenizer()
    if args.dry_run:
        return dry_run(args, tok)
    os.makedirs(args.out, exist_ok=True)
    args.tmp = "/tmp/bench_e2e"  # trainer output dirs (nothing is saved)
    peak = matmul_tflops()
    print(f"bf16 matmul: {peak:.0f} TFLOP/s on {torch.cuda.get_device_name()}", flush=True)
    meta = run_metadata()
    path = os.path.join(args.out, "bench_e2e.csv")
    rows = []
    for shape in args.datasets:
        for rnd in range(args.repeat):
            for name in args.trainers:
                try:
                    with llama_module_restored():
                        r = run_one(name, shape, args, tok, peak)
                except Exception as e:  # keep the other measurements; say what failed
                    print(f"FAILED {name} {shape}: {type(e).__name__}: {e}", flush=True)
                    continue
                r["round"] = rnd
                print(f"{shape:15s} {name:12s} round {rnd}: {r['pairs_per_s']:8.2f} pairs/s "
                      f"{r['unique_tokens_per_s']:9.0f} tok/s {r['peak_mem_gib']:6.1f} GiB  MFU {100 * r['mfu']:5.1f}%",
                      flush=True)
                if rnd == args.repeat - 1:
                    rows.append(r)
                append_csv(path, {**r, "pairs": args.pairs, **meta})
    # Like against like: each trainer over TRL at the same Liger setting (trl+liger for a +liger trainer, else trl);
    # blank where that TRL run is not among the trainers.
    print("\n| dataset | trainer | pairs/s | unique tok/s | peak GiB | MFU | x TRL, same Liger setting |")
    print("|---|---|---|---|---|---|---|")
    base = {(r["dataset"], r["trainer"]): r["pairs_per_s"] for r in rows if r["trainer"] in ("trl", "trl+liger")}

    def speedup(r):
        b = base.get((r["dataset"], trl_counterpart(r["trainer"])))
        return None if b is None else r["pairs_per_s"] / b

    for r in rows:
        sp = speedup(r)
        print(f"| {r['dataset']} | {r['trainer']} | {r['pairs_per_s']:.2f} | {r['unique_tokens_per_s']:.0f} | "
              f"{r['peak_mem_gib']:.1f} | {100 * r['mfu']:.1f}% | {'' if sp is None else f'{sp:.2f}x'} |")
    print(meta)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = [t for t in args.trainers if t not in ("trl", "trl+liger")]
        fig, ax = plt.subplots(figsize=(9, 4))
        for i, n in enumerate(names):
            ys = [next((speedup(r) or 0 for r in rows if r["trainer"] == n and r["dataset"] == d), 0)
                  for d in args.datasets]
            ax.bar([x + 0.8 * i / len(names) for x in range(len(args.datasets))], ys, 0.8 / len(names), label=n)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(args.datasets)), args.datasets, rotation=20)
        ax.set_ylabel("pairs/s vs trl.DPOTrainer, same Liger setting")
        ax.set_title(f"{args.model}, {args.pairs} pairs/step, bf16, {meta['gpu']}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "bench_e2e.png"), dpi=120)
    except Exception as e:
        print("plot skipped:", e)


if __name__ == "__main__":
    main()
