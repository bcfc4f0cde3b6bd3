"""How far one GPU goes: long prompts against trl.DPOTrainer, pairs/s and memory as the prompt grows.

Each point trains a random-init model of a real shape (bf16, gradient checkpointing, a live reference model or, with
LoRA, the base with adapters off, TRL's settings otherwise) on prompts of ``P`` tokens, each with ``--completions`` K
distinct responses of ``--response`` tokens to it, and times ``--steps`` optimizer steps after ``--warmup``. A
micro-batch holds ``--micro-prompts`` N prompts with all their pairs; an optimizer step ``--step-prompts`` S prompts
(gradient accumulation over S / N micro-batches; default S = N). K = 2 (default): a prompt is one pair, so ``N = 1,
S = 8`` is one pair per micro-batch accumulated to 8 pairs per step, and a list of N (``--micro-prompts 1 2 4 8``)
finds the most pairs per micro-batch that fit. K > 2: all K(K-1)/2 pairs of a prompt (chosen: the response of lower
index) go into one micro-batch for both trainers (per_device_train_batch_size = N * K(K-1)/2); TRL runs prompt +
response for each side of each pair, 2 * K(K-1)/2 sequences a prompt, ours keeps the pairs of a prompt together
(``group_by_prompt: auto``) and runs the prompt once and each distinct response once. A point that runs out of memory
is recorded as such and the grid goes on.

Per point: pairs/s (pairs, not micro-batches), unique tokens/s (per prompt the prompt once plus K responses with
their eos), peak memory, and MFU in two parts over the bf16 matmul rate measured at the start: matmul FLOPs (8N per
unique token, 6N with LoRA; N = parameters that multiply activations; the same useful work for both trainers:
TRL's repeated prompts count as lost MFU) and attention FLOPs (the pairs each trainer's attention must compute per
prompt: TRL each of its 2 * K(K-1)/2 sequences of prompt + response causally, ours the prompt once causally and
each of the K responses over the prompt and itself; forward 4 * Hq * D per (query, key) pair and layer, a policy step
3.5x that with checkpointing's recomputation counted once, the reference forward 1x). For ours each row also records
the ``prefix_sharing/*`` fractions the trainer logged, so a run whose pairs were not grouped as planned shows.

    python scripts/bench_scale.py --model llama-1b --prompts 1000 4000 16000 32000 64000 \\
        --trainers trl+liger ours-triton+liger
    python scripts/bench_scale.py --model llama-8b --lora 16 --prompts 16000 32000 \\
        --trainers trl+liger ours-triton+liger
    python scripts/bench_scale.py --prompts 32000 --completions 4 --trainers trl+liger ours-triton+liger ours-fa4+liger
    python scripts/bench_scale.py --prompts 16000 --micro-prompts 1 8 --step-prompts 8  # accumulation vs one batch
    python scripts/bench_scale.py --dry-run --prompts 32000 --completions 4  # CPU: data, micro-batches, counts

Writes ``bench_scale.csv`` (a row per point, with the GPU, versions, date and command) and ``bench_scale_*.png``
(pairs/s and peak memory against prompt length, one line per trainer) to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import os

import torch

from prefixdpo.benchmarks import (MODELS, StepTimer, append_csv, build_trainer, llama_module_restored, make_tokenizer,
                                  matmul_params, matmul_tflops, reference_and_adapters, run_metadata)

LONG_CONTEXT = dict(max_position_embeddings=131072, rope_scaling={  # Llama-3.1/3.2's own long-context RoPE
    "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192})


def pairs_per_prompt(completions: int) -> int:
    return completions * (completions - 1) // 2


def pair_data(prompt: int, response: int, n: int, completions: int = 2) -> list[dict]:
    """``n`` prompts of ``prompt`` tokens, each with ``completions`` distinct responses of ``response`` tokens and all
    their pairs (chosen: the lower index), prompt by prompt (one word = one token; the trainers append eos). A text is
    consecutive words from a start, so texts whose starts differ modulo the 29000 words differ in their first token:
    prompt j starts at 7j, its response k at (11 + 2k)j + 1 + k."""
    words = lambda start, k: " ".join(f"w{(start + i) % 29000}" for i in range(k))  # noqa: E731
    data = []
    for j in range(n):
        starts = [(11 + 2 * k) * j + 1 + k for k in range(completions)]
        if len({s % 29000 for s in starts}) < completions:
            raise ValueError(f"prompt {j}: two of its {completions} responses would be the same words")
        responses = [" " + words(s, response) for s in starts]
        text = words(j * 7, prompt)
        data += [{"prompt": text, "chosen": responses[a], "rejected": responses[b]}
                 for a, b in itertools.combinations(range(completions), 2)]
    return data


def unique_tokens(prompt: int, response: int, completions: int = 2) -> int:
    """Tokens of one micro-batch counted once each: the prompt, and every response with its eos."""
    return prompt + completions * (response + 1)


def attention_pairs(prompt: int, response: int, trl: bool, completions: int = 2) -> int:
    """(query, key) pairs one micro-batch's attention computes per head and layer: TRL runs prompt + response for
    both sides of each of the K(K-1)/2 pairs (each causal); ours runs the prompt once (causal) and each of the K
    responses over the prompt and itself."""
    seq = prompt + response + 1  # + eos
    if trl:
        return 2 * pairs_per_prompt(completions) * seq * (seq + 1) // 2
    r = response + 1
    return prompt * (prompt + 1) // 2 + completions * (r * prompt + r * (r + 1) // 2)


def run_point(name: str, prompt: int, micro: int, args, tok, peak: float) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    shape = {**MODELS[args.model], **LONG_CONTEXT}
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    n_params = matmul_params(model)
    ref, peft_config = reference_and_adapters(model, args.lora)
    k = args.completions
    pairs = pairs_per_prompt(k)
    step = step_prompts(micro, args)
    common = dict(output_dir=f"/tmp/bench_scale/{name}-{prompt}-{micro}", report_to="none", bf16=True,
                  per_device_train_batch_size=micro * pairs, gradient_accumulation_steps=step // micro,
                  max_steps=args.steps + args.warmup, logging_steps=1, save_strategy="no", gradient_checkpointing=True,
                  max_length=None, disable_tqdm=True)
    if args.optim:
        common["optim"] = args.optim
    timer = StepTimer()
    # ``step`` prompts per step. TRL's random order mixes the pairs of different prompts in a micro-batch, which costs
    # it the same (all prompts and all responses are of one length); ours keeps each prompt's pairs together.
    data = pair_data(prompt, args.response, (args.steps + args.warmup) * step, k)
    trainer = build_trainer(name, model, ref, data, tok, common, peft_config, callbacks=[timer.callback])
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps_s = args.steps / (timer.times[-1] - timer.times[args.warmup - 1])
    unique = step * unique_tokens(prompt, args.response, k)
    trl = name.split("+")[0] == "trl"
    heads, head_dim = shape["num_attention_heads"], shape["hidden_size"] // shape["num_attention_heads"]
    attn = 4 * heads * head_dim * shape["num_hidden_layers"] * step * attention_pairs(prompt, args.response, trl, k)
    attn_flops_per_step = attn * (3.5 + 1)  # policy forward + recompute + backward (3.5x), reference forward
    mm_flops_per_step = unique * (6 if args.lora else 8) * n_params
    mem = torch.cuda.max_memory_allocated() / 2**30
    logged = {}
    for key in ("tokens_saved_frac", "responses_deduplicated_frac"):
        seen = [h[f"prefix_sharing/{key}"] for h in trainer.state.log_history if f"prefix_sharing/{key}" in h]
        logged[key] = seen[-1] if seen else ""  # ours only
    del trainer, model, ref
    gc.collect()
    torch.cuda.empty_cache()
    dedup, expected = logged["responses_deduplicated_frac"], 1 - k / (2 * pairs)  # K branches for 2 * pairs sides
    if not trl and dedup != "" and abs(dedup - expected) > 1e-6:
        print(f"WARNING {name} P={prompt}: responses_deduplicated_frac {dedup:.3f}, not {expected:.3f}: the pairs of "
              "a prompt did not share a micro-batch, and the accounting above does not hold", flush=True)
    values = (steps_s * step * pairs, steps_s * unique, steps_s * mm_flops_per_step / (peak * 1e12),
              steps_s * attn_flops_per_step / (peak * 1e12), mem, logged["tokens_saved_frac"], dedup)
    return {**point_key(name, prompt, micro, args), "status": "ok", **dict(zip(METRICS, values))}


METRICS = ("pairs_per_s", "unique_tokens_per_s", "mfu_matmul", "mfu_attention", "peak_mem_gib", "tokens_saved_frac",
           "responses_deduplicated_frac")


def step_prompts(micro: int, args) -> int:
    """Prompts per optimizer step: --step-prompts, or one micro-batch's ``micro`` without it."""
    return args.step_prompts or micro


def point_key(name: str, prompt: int, micro: int, args) -> dict:
    return {"trainer": name, "model": args.model + (f"+lora{args.lora}" if args.lora else "")
            + (f"+{args.optim}" if args.optim else ""), "prompt": prompt, "response": args.response,
            "completions": args.completions, "micro_prompts": micro, "step_prompts": step_prompts(micro, args)}


def dry_run(args, tok) -> list[dict]:
    """What can be checked without a GPU, per prompt length: the data, the micro-batches our trainer draws from it
    (each one prompt's pairs when K > 2), the packed row's tokens against the unique tokens, and the accounting."""
    from prefixdpo import PrefixDPOConfig
    from prefixdpo.data.grouping import prompt_groups, training_micro_batches
    from prefixdpo.data.sharing import predict_sharing

    k, pairs = args.completions, pairs_per_prompt(args.completions)
    if len(args.micro_prompts) != 1:
        raise SystemExit("--dry-run takes one --micro-prompts")
    (micro,) = args.micro_prompts
    config = PrefixDPOConfig(output_dir="/tmp/bench_scale", report_to="none", bf16=False, use_cpu=True,
                             per_device_train_batch_size=micro * pairs, max_length=None)
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731  (word-level: TRL's tokenization of these texts)
    out = []
    for prompt in args.prompts:
        data = pair_data(prompt, args.response, (args.steps + args.warmup) * step_prompts(micro, args), k)
        tokenized = [{"prompt_ids": ids(d["prompt"]), "chosen_ids": ids(d["chosen"]) + [tok.eos_token_id],
                      "rejected_ids": ids(d["rejected"]) + [tok.eos_token_id]} for d in data]
        groups = prompt_groups(tokenized)
        batches = training_micro_batches(tokenized, config)
        f = predict_sharing([[tokenized[i] for i in b] for b in batches])
        r = {"prompt": prompt, "completions": k, "pairs": len(data), "prompts": len(groups),
             "micro_batches": len(batches),
             "whole_groups": all(sum(set(g) <= set(b) for b in batches) == 1 for g in groups),
             "unique_tokens": micro * unique_tokens(prompt, args.response, k), "row_tokens": sorted(set(f.row_tokens)),
             "tokens_saved_frac": f.tokens_saved_frac, "responses_deduplicated_frac": f.responses_deduplicated_frac,
             "attention_trl_over_ours": attention_pairs(prompt, args.response, True, k)
             / attention_pairs(prompt, args.response, False, k)}
        out.append(r)
        print(f"P={prompt} K={k}: {r['pairs']} pairs of {r['prompts']} prompts in {r['micro_batches']} micro-batches "
              f"of {micro * pairs} (each prompt's pairs in one: {r['whole_groups']}); {r['unique_tokens']} unique "
              f"tokens per micro-batch, packed row {r['row_tokens']}; tokens_saved_frac {r['tokens_saved_frac']:.3f}, "
              f"responses_deduplicated_frac {r['responses_deduplicated_frac']:.3f}; attention pairs TRL / ours "
              f"{r['attention_trl_over_ours']:.2f}", flush=True)
    return out


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(r["status"] == "ok" for r in rows):  # nothing to draw on log axes (every point ran out of memory)
        print(f"no point trained: no plot ({path})")
        return
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    line_of = lambda r: (r["trainer"], r.get("micro_prompts", 1), r.get("step_prompts", 1))  # noqa: E731
    batches = {line[1:] for line in map(line_of, rows)}
    for line in dict.fromkeys(map(line_of, rows)):
        name = line[0] if len(batches) == 1 else f"{line[0]} ({line[1]}/{line[2]} prompts per micro-batch/step)"
        ok = [r for r in rows if line_of(r) == line and r["status"] == "ok"]
        ax_speed.plot([r["prompt"] for r in ok], [r["pairs_per_s"] for r in ok], marker="o", label=name)
        ax_mem.plot([r["prompt"] for r in ok], [r["peak_mem_gib"] for r in ok], marker="o", label=name)
        oom = [r["prompt"] for r in rows if line_of(r) == line and r["status"] == "oom"]
        if oom:
            ax_mem.scatter(oom, [0] * len(oom), marker="x", label=f"{name}: out of memory")
    for ax, label in ((ax_speed, "pairs/s"), (ax_mem, "peak GiB")):
        ax.set(xscale="log", xlabel="prompt tokens", ylabel=label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_speed.set_yscale("log")
    k = rows[0]["completions"]
    batch = "one pair" if k == 2 else f"{k} responses, all {pairs_per_prompt(k)} pairs"
    fig.suptitle(f"{rows[0]['model']}: {batch} per prompt, responses of {rows[0]['response']} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", choices=list(MODELS))
    ap.add_argument("--lora", type=int, default=0, metavar="R")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1000, 4000, 16000, 32000, 64000, 128000])
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--completions", type=int, default=2, metavar="K",
                    help="responses per prompt; all K(K-1)/2 pairs of a prompt form one micro-batch (default 2: one "
                    "pair)")
    ap.add_argument("--trainers", nargs="+", default=["trl+liger", "ours-triton+liger"])
    ap.add_argument("--micro-prompts", type=int, nargs="+", default=[1], metavar="N",
                    help="prompts (each with its K(K-1)/2 pairs) per micro-batch; several: a point each (default 1)")
    ap.add_argument("--step-prompts", type=int, default=None, metavar="S",
                    help="prompts per optimizer step, by gradient accumulation over S / N micro-batches (default: N)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--optim", default=None, help="TRL's optim, e.g. adafactor: a full 8B fine-tune with AdamW (the "
                    "default) fits a 141 GB GPU, not an 80 GB one")
    ap.add_argument("--skip", nargs="*", default=[], metavar="TRAINER@PROMPT",
                    help="points not to run (e.g. trl+liger@128000: too slow for the call)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: build the data and check the micro-batches and the accounting")
    args = ap.parse_args(argv)
    if args.completions < 2:
        ap.error("--completions needs at least 2 responses per prompt")
    if args.step_prompts and any(args.step_prompts % n for n in args.micro_prompts):
        ap.error(f"--step-prompts {args.step_prompts} is not a multiple of every --micro-prompts {args.micro_prompts}")
    tok = make_tokenizer()
    if args.dry_run:
        return dry_run(args, tok)
    os.makedirs(args.out, exist_ok=True)
    peak = matmul_tflops()
    print(f"bf16 matmul: {peak:.0f} TFLOP/s on {torch.cuda.get_device_name()}", flush=True)
    meta = run_metadata()
    rows = []
    for prompt, micro, name in itertools.product(args.prompts, args.micro_prompts, args.trainers):
        if f"{name}@{prompt}" in args.skip:
            continue
        try:
            with llama_module_restored():
                r = run_point(name, prompt, micro, args, tok, peak)
        except torch.cuda.OutOfMemoryError:
            # The columns of a measured row, empty: the CSV's header is the first row's keys.
            r = {**point_key(name, prompt, micro, args), "status": "oom", **dict.fromkeys(METRICS, "")}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(r)
        append_csv(os.path.join(args.out, "bench_scale.csv"), {**r, **meta})
        where = f"{r['model']:16s} P={prompt:6d} K={args.completions} N={micro}/{r['step_prompts']} {name:22s}"
        if r["status"] == "ok":
            print(f"{where} {r['pairs_per_s']:7.3f} pairs/s {r['unique_tokens_per_s']:8.0f} tok/s  MFU matmul "
                  f"{100 * r['mfu_matmul']:4.1f}% attention {100 * r['mfu_attention']:4.1f}%  "
                  f"{r['peak_mem_gib']:6.1f} GiB", flush=True)
        else:
            print(f"{where} out of memory", flush=True)
    suffix = ("_lora" if args.lora else "") + (f"_k{args.completions}" if args.completions > 2 else "")
    plot(rows, os.path.join(args.out, f"bench_scale_{args.model}{suffix}.png"))
    print("\n| model | prompt | K | prompts per micro-batch / step | trainer | pairs/s | tok/s | MFU matmul | MFU attn "
          "| peak GiB | x first trainer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = ("prompt", "micro_prompts")
        first = next((x for x in rows if all(x[c] == r[c] for c in same) and x["status"] == "ok"), None)
        batch = f"{r['micro_prompts']} / {r['step_prompts']}"
        if r["status"] != "ok":
            print(f"| {r['model']} | {r['prompt']} | {r['completions']} | {batch} | {r['trainer']} | OOM | | | | | |")
            continue
        print(f"| {r['model']} | {r['prompt']} | {r['completions']} | {batch} | {r['trainer']} | "
              f"{r['pairs_per_s']:.3f} | "
              f"{r['unique_tokens_per_s']:.0f} | {100 * r['mfu_matmul']:.1f}% | {100 * r['mfu_attention']:.1f}% | "
              f"{r['peak_mem_gib']:.1f} | {r['pairs_per_s'] / first['pairs_per_s']:.2f} |")


if __name__ == "__main__":
    main()
