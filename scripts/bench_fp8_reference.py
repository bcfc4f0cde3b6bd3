"""The FP8 reference model: how far its log-probs and a DPO run move from the bf16 reference.

One GPU, a random-init Llama-3.2-1B shape (bench_e2e's), synthetic Capybara-shape pairs, bf16. Two measurements:

1. Per-sequence reference log-probs: the same batches through the reference model with ``ref_attn_backend`` None
   (bf16 triton attention), ``triton_fp8`` without and with the rotation; the relative difference of each
   sequence's summed log-prob to bf16's (max and median), and, as the scale of what any bf16 change does, the
   difference between two bf16 kernels' (flex vs triton) results.
2. A DPO run of ``--steps`` steps (AdamW, constant lr) with the bf16 reference and with the FP8 one, same seed,
   same data: the loss at every step and the largest difference; and, as the noise floor any change of the
   reference's attention kernel causes, the same run with a bf16 FlexAttention reference (the policy runs triton).

Honest caveat, printed with the results: a random-init model's attention is diffuse and its log-probs are dominated
by the near-uniform LM head, so these differences say how much FP8 attention moves *this* model; a trained model
with sharp attention and outlier channels is the harder case (bench_attention.py --fp8 measures the kernel's error
on inputs with outlier channels).

    python scripts/bench_fp8_reference.py --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import statistics
import sys

import torch

from prefixdpo import benchmarks


def build(args, tok, data, ref_backend, fp8_rotation, steps):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, LlamaConfig

    from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**benchmarks.MODELS[args.model]), dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    cfg = PrefixDPOConfig(output_dir=f"/tmp/bench_fp8_ref/{ref_backend}-{fp8_rotation}", report_to="none", bf16=True,
                          per_device_train_batch_size=args.pairs, max_steps=steps, logging_steps=1,
                          save_strategy="no", gradient_checkpointing=True, max_length=None, disable_tqdm=True,
                          learning_rate=args.lr, lr_scheduler_type="constant", seed=0, attn_backend="triton",
                          ref_attn_backend=ref_backend, fp8_rotation=fp8_rotation)
    return PrefixDPOTrainer(model=model, ref_model=ref, args=cfg, train_dataset=Dataset.from_list(data),
                            processing_class=tok)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-1b", choices=list(benchmarks.MODELS))
    ap.add_argument("--dataset", default="capybara", choices=list(benchmarks.SHAPES))
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--batches", type=int, default=8, help="batches for the per-sequence log-prob comparison")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    tok = benchmarks.make_tokenizer()
    data = benchmarks.make_data(args.dataset, args.pairs * max(args.steps, args.batches), seed=0)
    gpu = torch.cuda.get_device_name()
    import transformers
    import triton
    import trl

    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                trl=trl.__version__, date=datetime.date.today().isoformat(),
                command=" ".join(["python"] + sys.argv))
    print(f"# {gpu} | torch {torch.__version__} | triton {triton.__version__} | {args.model} {args.dataset}")

    # ---------------------------------------------------------------- 1. per-sequence reference log-probs
    from prefixdpo.modeling.packed import enable_packed_forward

    trainer = build(args, tok, data, None, True, 1)
    ref = trainer.accelerator.unwrap_model(trainer.ref_model)
    it = iter(trainer.get_train_dataloader())
    batches = [trainer._prepare_inputs(next(it)) for _ in range(args.batches)]

    def ref_logps(backend):
        enable_packed_forward(ref, backend, reference=True)
        out = []
        for b in batches:
            c, r = trainer.compute_ref_log_probs(trainer.ref_model, b)
            out.append(torch.cat([c, r]).double())
        return torch.cat(out)

    base = ref_logps("triton")
    variants = {"bf16 flex (scale of a bf16 change)": "flex", "fp8": "triton_fp8", "fp8 + rotation": "triton_fp8_rotate"}
    rows = []
    for label, backend in variants.items():
        got = ref_logps(backend)
        rel = ((got - base).abs() / base.abs()).tolist()
        rows.append(dict(variant=label, sequences=len(rel), max_rel=max(rel), median_rel=statistics.median(rel),
                         mean_logp=base.mean().item()))
    del trainer, ref, batches
    torch.cuda.empty_cache()

    # ---------------------------------------------------------------- 2. DPO runs: bf16 reference vs FP8 reference
    losses = {}
    runs = {"bf16": (None, True), "bf16 flex reference (noise floor)": ("flex", True),
            "fp8 + rotation": ("triton_fp8", True), "fp8": ("triton_fp8", False)}
    for label, (backend, rot) in runs.items():
        t = build(args, tok, data, backend, rot, args.steps)
        t.train()
        losses[label] = [h["loss"] for h in t.state.log_history if "loss" in h]
        del t
        torch.cuda.empty_cache()

    path = os.path.join(args.out, "bench_fp8_reference.csv")
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["kind", "variant", "value", "detail"] + list(meta))
        if f.tell() == 0:
            w.writeheader()
        for r in rows:
            w.writerow(dict(kind="ref_logps_max_rel", variant=r["variant"], value=r["max_rel"],
                            detail=f"median {r['median_rel']:.3e} over {r['sequences']} sequences", **meta))
        for label, ls in losses.items():
            w.writerow(dict(kind="loss_curve", variant=label, value=max(ls), detail=" ".join(f"{x:.5f}" for x in ls),
                            **meta))

    print(f"\n# {meta['command']}  ({meta['date']})")
    print("## reference log-probs per sequence, relative to bf16 triton")
    print(f"{'variant':<36}{'max rel':>10}{'median rel':>12}  (mean summed logp {rows[0]['mean_logp']:.1f})")
    for r in rows:
        print(f"{r['variant']:<36}{r['max_rel']:>10.2e}{r['median_rel']:>12.2e}")
    print(f"## {args.steps}-step DPO loss: largest |difference| to the bf16 reference's run at any step")
    for label, ls in losses.items():
        d = max(abs(a - b) for a, b in zip(ls, losses["bf16"]))
        print(f"{label:<36} first {ls[0]:.4f} last {ls[-1]:.4f}   max |d loss| vs bf16 {d:.2e}")
    print("(random-init model: diffuse attention, near-uniform LM head; see the script's docstring)")
    print(f"CSV appended: {path}")


if __name__ == "__main__":
    main()
