"""Profile PrefixDPOTrainer training steps on one GPU (torch profiler) and print where the time goes.

Uses bench_e2e's model and data shapes. Prints the wall time per step, then the top ops by self CUDA time and by
self CPU time over the profiled steps.

    python scripts/profile_step.py --dataset hh-rlhf --pairs 8
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import bench_e2e  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="hh-rlhf", choices=list(bench_e2e.SHAPES))
    ap.add_argument("--model", default="llama-1b", choices=list(bench_e2e.MODELS))
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=None, help="token-budget batching with this budget")
    args = ap.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

    from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

    tok = bench_e2e.make_tokenizer()
    n = args.pairs * (args.warmup + args.steps) * (16 if args.max_tokens else 1)
    data = bench_e2e.make_data(args.dataset, n, seed=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**bench_e2e.MODELS[args.model]), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    prof = torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA],
        schedule=torch.profiler.schedule(wait=0, warmup=args.warmup, active=args.steps, repeat=1),
    )
    times = []

    class CB(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter())
            prof.step()

    extra = dict(batching="token_budget", max_tokens_per_batch=args.max_tokens) if args.max_tokens else {}
    cfg = PrefixDPOConfig(output_dir="/tmp/profile_step", report_to="none", bf16=True, attn_backend=args.backend, **extra,
                          per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
                          logging_steps=1, save_strategy="no", gradient_checkpointing=True, max_length=None,
                          disable_tqdm=True, dataloader_num_workers=2)
    trainer = PrefixDPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(data),
                               processing_class=tok, callbacks=[CB()])
    with prof:
        trainer.train()
    steps = [b - a for a, b in zip(times, times[1:])]
    print("step wall times (ms):", " ".join(f"{1000 * s:.0f}" for s in steps))
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
