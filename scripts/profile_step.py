"""Profile PrefixDPOTrainer training steps on one GPU (torch profiler) and print where the time goes.

Uses the benchmarks' model and data shapes (prefixdpo.benchmarks). Prints the wall time per step, then the top ops by self CUDA time and by
self CPU time over the profiled steps.

    python scripts/profile_step.py --dataset hh-rlhf --pairs 8

``--breakdown`` runs without the profiler and splits each step into its phases instead (policy forward, reference
forward, loss and metrics, backward, gradient clipping, optimizer step, the rest): for each, the host time it took to
issue (no syncs added inside a step) and the GPU time between CUDA events at its ends, and it lists every call site
that synchronized host and GPU (``torch.cuda.set_sync_debug_mode``). On a host-bound step the host times add up to
the step time; the phase with the most host time is the one to cut.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch

from prefixdpo import benchmarks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dataset", default="hh-rlhf",
                    choices=list(benchmarks.SHAPES) + list(benchmarks.ALL_PAIRS_SHAPES))
    ap.add_argument("--model", default="llama-1b", choices=list(benchmarks.MODELS))
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--max-tokens", type=int, default=None, help="token-budget batching with this budget")
    ap.add_argument("--breakdown", action="store_true", help="per-phase host/GPU times and sync sites (no profiler)")
    ap.add_argument("--cprofile", action="store_true",
                    help="Python-level host profile (cProfile) of training steps after the warm-up")
    ap.add_argument("--no-gc", action="store_true", help="gradient_checkpointing=False")
    ap.add_argument("--nonreentrant", action="store_true", help="non-reentrant checkpointing (TRL's default kind)")
    ap.add_argument("--liger", action="store_true", help="use_liger_kernel=True")
    ap.add_argument("--compile", choices=["none", "model", "regions"], default="none",
                    help="torch_compile=True: Trainer's whole-model compile, or accelerate's regional compilation")
    args = ap.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig, TrainerCallback

    from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

    tok = benchmarks.make_tokenizer()
    n = args.pairs * (args.warmup + args.steps) * (16 if args.max_tokens else 1)
    data = benchmarks.make_data(args.dataset, n, seed=0)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**benchmarks.MODELS[args.model]), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    os.environ["ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"] = "1" if args.compile == "regions" else "0"
    extra = dict(batching="token_budget", max_tokens_per_batch=args.max_tokens) if args.max_tokens else {}
    if args.nonreentrant:
        extra["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    cfg = PrefixDPOConfig(use_liger_kernel=args.liger, output_dir="/tmp/profile_step", report_to="none", bf16=True, attn_backend=args.backend, **extra,
                          per_device_train_batch_size=args.pairs, max_steps=args.warmup + args.steps,
                          logging_steps=1, save_strategy="no", gradient_checkpointing=not args.no_gc, max_length=None,
                          disable_tqdm=True, dataloader_num_workers=2, torch_compile=args.compile != "none")
    if args.breakdown:
        return breakdown(args, cfg, model, ref, Dataset.from_list(data), tok)
    if args.cprofile:
        return host_profile(args, cfg, model, ref, Dataset.from_list(data), tok)
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

    trainer = PrefixDPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(data),
                               processing_class=tok, callbacks=[CB()])
    with prof:
        trainer.train()
    steps = [b - a for a, b in zip(times, times[1:])]
    print("step wall times (ms):", " ".join(f"{1000 * s:.0f}" for s in steps))
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


def breakdown(args, cfg, model, ref, dataset, tok):
    """Per-phase host and GPU times of the timed steps, and the call sites that synchronized (module docstring)."""
    import collections
    import traceback
    import warnings

    from transformers import TrainerCallback

    from prefixdpo import PrefixDPOTrainer

    records = []  # (step, phase, host seconds, start event, end event)
    state = {"step": -1, "on": False}
    syncs = collections.Counter()

    def timed(phase, fn):
        def wrapper(*a, **kw):
            if not state["on"]:
                return fn(*a, **kw)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                t1 = time.perf_counter()
                e1.record()
                records.append((state["step"], phase, t1 - t0, e0, e1))
        return wrapper

    step_ends = []

    class CB(TrainerCallback):
        def on_step_begin(self, a, st, control, **kw):
            state["step"] += 1
            state["on"] = state["step"] >= args.warmup
            torch.cuda.set_sync_debug_mode("warn" if state["on"] else 0)

        def on_step_end(self, a, st, control, **kw):
            torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            step_ends.append(time.perf_counter())

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
            ours = [f for f in frames if "/site-packages/torch/" not in f.filename][-3:]
            syncs[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}({f.name})" for f in reversed(ours))] += 1

    trainer = PrefixDPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tok,
                               callbacks=[CB()])
    policy = trainer.model
    policy.forward = timed("policy forward", policy.forward)
    trainer.ref_model.forward = timed("reference forward", trainer.ref_model.forward)
    trainer.compute_loss = timed("compute_loss (forwards, loss, metrics)", trainer.compute_loss)
    trainer.accelerator.backward = timed("backward", trainer.accelerator.backward)
    trainer.accelerator.clip_grad_norm_ = timed("clip_grad_norm", trainer.accelerator.clip_grad_norm_)
    trainer.create_optimizer()
    trainer.optimizer.step = timed("optimizer step", trainer.optimizer.step)
    warnings.showwarning = on_warning
    warnings.simplefilter("always")
    trainer.train()
    torch.cuda.synchronize()
    timed_steps = len(step_ends) - args.warmup
    wall = (step_ends[-1] - step_ends[args.warmup - 1]) / timed_steps
    host, gpu = collections.defaultdict(float), collections.defaultdict(float)
    for step, phase, h, e0, e1 in records:
        host[phase] += h / timed_steps
        gpu[phase] += e0.elapsed_time(e1) / 1000 / timed_steps
    print(f"\nstep wall time {1000 * wall:.1f} ms (mean of {timed_steps} steps)")
    print("| phase | host ms | GPU ms (event to event) |\n|---|---|---|")
    for phase in host:
        print(f"| {phase} | {1000 * host[phase]:.1f} | {1000 * gpu[phase]:.1f} |")
    print(f"\nsynchronizing calls per step ({sum(syncs.values()) / timed_steps:.1f}):")
    for site, n in syncs.most_common(25):
        print(f"  {n / timed_steps:5.1f}  {site}")


def host_profile(args, cfg, model, ref, dataset, tok):
    """cProfile of ``training_step`` + optimizer step on one batch, repeated, after ``--warmup`` trained steps."""
    import cProfile
    import pstats

    from prefixdpo import PrefixDPOTrainer

    trainer = PrefixDPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=dataset, processing_class=tok)
    cfg.max_steps = args.warmup
    trainer.train()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model = trainer.model_wrapped

    def step():
        trainer.training_step(model, inputs)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    print(f"\nplain step (no profiler): {1000 * (time.perf_counter() - t0) / args.steps:.1f} ms")
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    prof.disable()
    st = pstats.Stats(prof)
    st.sort_stats("tottime").print_stats(args.rows)
    st.sort_stats("cumulative").print_stats(args.rows * 2)


if __name__ == "__main__":
    main()
