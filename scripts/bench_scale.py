"""How far one GPU goes: long prompts against trl.DPOTrainer, pairs/s and memory as the prompt grows.

Each point trains a random-init model of a real shape (bf16, gradient checkpointing, a live reference model or, with
LoRA, the base with adapters off, TRL's settings otherwise) on pairs of one prompt of ``P`` tokens and two responses
of ``--response`` tokens, one pair per micro-batch, and times ``--steps`` steps after ``--warmup``. A point that runs
out of memory is recorded as such and the grid goes on. Per point: pairs/s, unique tokens/s (prompt once plus both
responses), peak memory, and MFU in two parts over the bf16 matmul rate measured at the start: matmul FLOPs (8N per
unique token, 6N with LoRA; N = parameters that multiply activations) and attention FLOPs (the pairs each trainer's
attention must compute: TRL runs prompt+response twice, ours the prompt once; forward 4 * Hq * D per (query, key)
pair and layer, a policy step 3.5x that with checkpointing's recomputation counted once, the reference forward 1x).

    python scripts/bench_scale.py --model llama-1b --prompts 1000 4000 16000 32000 64000 \
        --trainers trl+liger ours-triton+liger
    python scripts/bench_scale.py --model llama-8b --lora 16 --prompts 16000 32000 --trainers trl+liger ours-triton+liger

Writes ``bench_scale.csv`` (a row per point, with the GPU, versions, date and command) and ``bench_scale.png``
(pairs/s and peak memory against prompt length, one line per trainer) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import os

import torch

from prefixdpo.benchmarks import (MODELS, StepTimer, append_csv, build_trainer, llama_module_restored, make_tokenizer,
                                  matmul_params, matmul_tflops, reference_and_adapters, run_metadata)

LONG_CONTEXT = dict(max_position_embeddings=131072, rope_scaling={  # Llama-3.1/3.2's own long-context RoPE
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})


def pair_data(prompt: int, response: int, n: int) -> list[dict]:
    """``n`` pairs of a ``prompt``-token prompt and two ``response``-token responses (one word = one token; the
    trainers append eos)."""
    words = lambda start, k: " ".join(f"w{(start + i) % 29000}" for i in range(k))  # noqa: E731
    return [{"prompt": words(j * 7, prompt), "chosen": " " + words(j * 11 + 1, response),
             "rejected": " " + words(j * 13 + 2, response)} for j in range(n)]


def attention_pairs(prompt: int, response: int, trl: bool) -> int:
    """(query, key) pairs a pair's attention computes per head and layer: TRL runs prompt + response twice (each
    causal); ours runs the prompt once (causal) and each response over the prompt and itself."""
    seq = prompt + response + 1  # + eos
    if trl:
        return 2 * seq * (seq + 1) // 2
    r = response + 1
    return prompt * (prompt + 1) // 2 + 2 * (r * prompt + r * (r + 1) // 2)


def run_point(name: str, prompt: int, args, tok, peak: float) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {**MODELS[args.model], **LONG_CONTEXT}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    n_params = matmul_params(model)
    ref, peft_config = reference_and_adapters(model, args.lora)
    common = dict(output_dir=f"/tmp/bench_scale/{name}-{prompt}", report_to="none", bf16=True,
                  per_device_train_batch_size=1, gradient_accumulation_steps=1, max_steps=args.steps + args.warmup,
                  logging_steps=1, save_strategy="no", gradient_checkpointing=True, max_length=None,
                  disable_tqdm=True)
    if args.optim:
        common["optim"] = args.optim
    timer = StepTimer()
    trainer = build_trainer(name, model, ref, pair_data(prompt, args.response, args.steps + args.warmup), tok,
                            common, peft_config, callbacks=[timer.callback])
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    dt = timer.times[-1] - timer.times[args.warmup - 1]
    pairs_s = args.steps / dt
    unique = prompt + 2 * (args.response + 1)
    trl = name.split("+")[0] == "trl"
    heads, head_dim = shape["num_attention_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    attn = 4 * heads * head_dim * shape["num_hidden_layers"] * attention_pairs(prompt, args.response, trl)
    attn_flops_per_pair = attn * (3.5 + 1)  # policy forward + recompute + backward (3.5x), reference forward
    mm_flops_per_pair = unique * (6 if args.lora else 8) * n_params
    mem = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model, ref
    gc.collect()
    torch.cuda.empty_cache()
    return {"trainer": name, "model": args.model + (f"+lora{args.lora}" if args.lora else ""), "prompt": prompt,
            "response": args.response, "status": "ok", "pairs_per_s": pairs_s, "unique_tokens_per_s": pairs_s * unique,
            "mfu_matmul": pairs_s * mm_flops_per_pair / (peak * 1e12),
            "mfu_attention": pairs_s * attn_flops_per_pair / (peak * 1e12), "peak_mem_gib": mem}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["trainer"] for r in rows):
        ok = [r for r in rows if r["trainer"] == name and r["status"] == "ok"]
        ax_speed.plot([r["prompt"] for r in ok], [r["pairs_per_s"] for r in ok], marker="o", label=name)
        ax_mem.plot([r["prompt"] for r in ok], [r["peak_mem_gib"] for r in ok], marker="o", label=name)
        oom = [r["prompt"] for r in rows if r["trainer"] == name and r["status"] == "oom"]
        if oom:
            ax_mem.scatter(oom, [0] * len(oom), marker="x", label=f"{name}: out of memory")
    for ax, label in ((ax_speed, "pairs/s"), (ax_mem, "peak GiB")):
        ax.set(xscale="log", xlabel="prompt tokens", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_speed.set_yscale("log")
    fig.suptitle(f"{rows[0]['model']}: one pair per micro-batch, responses of {rows[0]['response']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", choices=list(MODELS))
    ap.add_argument("--lora", type=int, default=0, metavar="R")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1000, 4000, 16000, 32000, 64000, 128000])
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--trainers", nargs="+", default=["trl+liger", "ours-triton+liger"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--optim", default=None, help="e.g. adafactor, for a full 8B fine-tune on one GPU")
    ap.add_argument("--skip", nargs="*", default=[], metavar="TRAINER@PROMPT",
                    help="points not to run (e.g. trl+liger@128000: too slow for the call)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tok = make_tokenizer()
    peak = matmul_tflops()
    print(f"bf16 matmul: {peak:.0f} TFLOP/s on {torch.cuda.get_device_name()}", flush=True)
    meta = run_metadata()
    rows = []
    for prompt in args.prompts:
        for name in args.trainers:
            if f"{name}@{prompt}" in args.skip:
                continue
            try:
                with llama_module_restored():
                    r = run_point(name, prompt, args, tok, peak)
            except torch.cuda.OutOfMemoryError:
                r = {"trainer": name, "model": args.model + (f"+lora{args.lora}" if args.lora else ""),
                     "prompt": prompt, "response": args.response, "status": "oom"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            append_csv(os.path.join(args.out, "bench_scale.csv"), {**r, **meta})
            if r["status"] == "ok":
                print(f"{r['model']:16s} P={prompt:6d} {name:22s} {r['pairs_per_s']:7.3f} pairs/s "
                      f"{r['unique_tokens_per_s']:8.0f} tok/s  MFU matmul {100 * r['mfu_matmul']:4.1f}% attention "
                      f"{100 * r['mfu_attention']:4.1f}%  {r['peak_mem_gib']:6.1f} GiB", flush=True)
            else:
                print(f"{r['model']:16s} P={prompt:6d} {name:22s} out of memory", flush=True)
    plot(rows, os.path.join(args.out, f"bench_scale_{args.model}{'_lora' if args.lora else ''}.png"))
    print("\n| model | prompt | trainer | pairs/s | tok/s | MFU matmul | MFU attn | peak GiB | x first trainer |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        first = next((x for x in rows if x["prompt"] == r["prompt"] and x["status"] == "ok"), None)
        if r["status"] != "ok":
            print(f"| {r['model']} | {r['prompt']} | {r['trainer']} | OOM | | | | | |")
            continue
        print(f"| {r['model']} | {r['prompt']} | {r['trainer']} | {r['pairs_per_s']:.3f} | "
              f"{r['unique_tokens_per_s']:.0f} | {100 * r['mfu_matmul']:.1f}% | {100 * r['mfu_attention']:.1f}% | "
              f"{r['peak_mem_gib']:.1f} | {r['pairs_per_s'] / first['pairs_per_s']:.2f} |")


if __name__ == "__main__":
    main()
