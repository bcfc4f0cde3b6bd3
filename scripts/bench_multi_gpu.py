"""Multi-GPU check and benchmark: the recipe under DDP, FSDP2 and DeepSpeed ZeRO-3, on 1 and 2 GPUs.

Every run is the user's command, ``accelerate launch --config_file recipes/accelerate/<topology>.yaml recipes/dpo.py
--config <run>.yaml``, on a random-init model of a real architecture's shape (default Llama-3.2-1B) saved to a local
directory with an offline tokenizer, and synthetic preference data of a public dataset's shape (prefixdpo.benchmarks)
in a local JSONL file. The script then reads each run's TensorBoard log and prints, per run: pairs/s (median of the
logged ``throughput/pairs_per_second`` over the steps after warm-up; counted over all processes), peak GPU memory
per GPU (polled through NVML: what nvidia-smi shows, CUDA context and PyTorch's cache included), and

- for runs with the same *global* batch as the 1-GPU run of their topology: the largest relative difference of the
  loss and of ``logps/chosen`` over the first ``--compare_steps`` steps;
- for resumed runs: the largest relative difference from the uninterrupted run over the steps after the checkpoint.

A CSV row per run goes to ``--csv`` (default ``$OUT/bench_multi_gpu.csv``); each run's output is kept in
``<workdir>/<run>/`` and its console log in ``$OUT/<run>.log``.

    python scripts/bench_multi_gpu.py --runs ddp fsdp2 --out $OUT     # needs 2 GPUs
    python scripts/bench_multi_gpu.py --runs zero3 --out $OUT         # needs deepspeed
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

from prefixdpo.benchmarks import MODELS, SHAPES, make_data, make_tokenizer  # noqa: E402

# "tiny": a smoke test of this script on the CPU (one process; no NVML there, so no memory figures).
MODELS = dict(MODELS, tiny=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=30003, max_position_embeddings=4096))


def prepare(workdir: str, model: str, shape: str, n_pairs: int, args) -> tuple[str, str, str]:
    """Model directory (random init, bf16 safetensors + tokenizer), data JSONL and run YAML; reused when present."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, LlamaConfig

    model_dir = os.path.join(workdir, f"model-{model}")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        torch.manual_seed(0)
        m = AutoModelForCausalLM.from_config(LlamaConfig(**MODELS[model]), dtype=torch.bfloat16)
        m.save_pretrained(model_dir)
        make_tokenizer().save_pretrained(model_dir)
        del m
    data = os.path.join(workdir, f"data-{shape}.jsonl")
    with open(data, "w") as f:
        for row in make_data(shape, n_pairs, seed=0):
            f.write(json.dumps(row) + "\n")
    run_yaml = os.path.join(workdir, "run.yaml")
    cfg = {
        "model_name_or_path": model_dir,
        "dtype": "float32",  # fp32 master weights, bf16 autocast (accelerate mixed_precision: bf16)
        "attn_implementation": "sdpa",  # replaced by prefix_attn in the packed forward
        "dataset_name": data,
        "dataset_test_split": None,
        "learning_rate": args.lr,  # large enough that the loss moves visibly within the compared steps
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "beta": 0.1,
        "max_length": args.max_length,
        "bf16": True,
        "gradient_checkpointing": False,
        "attn_backend": args.backend,
        "prefix_sharing": True,
        "logging_steps": 1,
        "report_to": "tensorboard",
        "save_strategy": "no",
        "dataloader_num_workers": 2,
        "disable_tqdm": True,
        "seed": 42,
        "data_seed": 42,
    }
    with open(run_yaml, "w") as f:
        yaml.safe_dump(cfg, f)
    return model_dir, data, run_yaml


class MemoryPoller:
    """Peak memory used per GPU, polled through NVML every 0.2 s."""

    def __init__(self):
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no NVIDIA driver (the CPU smoke test)
            self.peak = self.base = []
            return
        self.nvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        self.base = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
        self.peak = list(self.base)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            for i, h in enumerate(self.handles):
                self.peak[i] = max(self.peak[i], self.nvml.nvmlDeviceGetMemoryInfo(h).used)
            time.sleep(0.2)

    def stop(self) -> list[float]:
        if not self.base:
            return []
        self._stop.set()
        self._thread.join()
        return [(p - b) / 2**30 for p, b in zip(self.peak, self.base)]


def read_scalars(out_dir: str) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the run's TensorBoard event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in glob.glob(os.path.join(out_dir, "**", "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def launch(name: str, topology: str, nproc: int, bs: int, steps: int, run_yaml: str, workdir: str, args,
           extra: list[str], fp32: bool = False) -> dict:
    out_dir = os.path.join(workdir, name)
    shutil.rmtree(out_dir, ignore_errors=True)
    import torch

    cpu = [] if torch.cuda.is_available() else ["--cpu"]  # the CPU smoke test
    fp32 = fp32 or bool(cpu)
    if fp32:
        cpu += ["--mixed_precision", "no"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "recipes", "accelerate", f"{topology}.yaml"),
           "--num_processes", str(nproc), *cpu, os.path.join(ROOT, "recipes", "dpo.py"), "--config", run_yaml,
           "--output_dir", out_dir,
           "--per_device_train_batch_size", str(bs), "--max_steps", str(steps), *extra, *(["--bf16", "false"] if fp32 else [])]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(nproc)), PYTHONFAULTHANDLER="1")
    print(f"\n## {name}: {' '.join(cmd)}", flush=True)
    poller = MemoryPoller()
    t0 = time.perf_counter()
    with open(os.path.join(args.out, f"{name}.log"), "w") as log:
        # Own process group: on a timeout the launcher *and* its workers go (a hung worker left behind would hold
        # its GPU and slow every later run).
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        try:
            rc = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            import psutil  # torchrun may give its workers sessions of their own: kill the whole tree

            tree = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, signal.SIGKILL)
            for p in tree:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait()
            rc = "timeout"
    wall = time.perf_counter() - t0
    mem = poller.stop()[:nproc]
    if rc != 0:
        with open(os.path.join(args.out, f"{name}.log")) as f:
            print("".join(f.readlines()[-25:]), flush=True)
    scalars = read_scalars(out_dir) if rc == 0 else {}
    tput = scalars.get("train/throughput/pairs_per_second", {})
    after = [v for s, v in sorted(tput.items()) if s > args.warmup_steps]
    print(f"   rc={rc} wall={wall:.0f}s mem/GPU={[round(m, 1) for m in mem]} GiB "
          f"pairs/s={statistics.median(after) if after else float('nan'):.2f}", flush=True)
    for tag in ("train/loss", "train/logps/chosen"):  # the raw numbers, so a later timeout loses nothing
        first = sorted(scalars.get(tag, {}).items())[: args.compare_steps]
        print(f"   {tag}: " + " ".join(f"{s}:{v:.7g}" for s, v in first), flush=True)
    return {"name": name, "topology": topology, "gpus": nproc, "per_device_bs": bs, "global_bs": bs * nproc,
            "rc": rc, "wall_s": wall, "pairs_per_s": statistics.median(after) if after else float("nan"),
            "peak_mem_gib_per_gpu": max(mem) if mem else float("nan"), "scalars": scalars, "out_dir": out_dir}


def max_rel_diff(a: dict, b: dict, tag: str, steps) -> float:
    xa, xb = a["scalars"].get(tag, {}), b["scalars"].get(tag, {})
    diffs = [abs(xa[s] - xb[s]) / max(abs(xb[s]), 1e-12) for s in steps if s in xa and s in xb]
    return max(diffs) if len(diffs) == len(list(steps)) else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="+", default=["ddp", "fsdp2", "zero3"], choices=["ddp", "fsdp2", "zero3"])
    ap.add_argument("--fp32_check", nargs="*", default=[], choices=["ddp", "fsdp2", "zero3"],
                    help="also run 1 vs 2 GPUs in float32 (no autocast) for --compare_steps steps: separates bf16 "
                    "rounding (the row of 8 pairs vs two rows of 4 round differently) from a real difference")
    ap.add_argument("--model", default="llama-1b", choices=list(MODELS))
    ap.add_argument("--shape", default="capybara", choices=list(SHAPES))
    ap.add_argument("--pairs", type=int, default=8, help="pairs per GPU per step in the throughput runs")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ref_steps", type=int, default=None,
                    help="steps of the 1-GPU runs (default --steps; --compare_steps is enough for the loss check)")
    ap.add_argument("--no_throughput", action="store_true", help="skip the 2-GPU runs at --pairs per GPU")
    ap.add_argument("--warmup_steps", type=int, default=5, help="steps left out of pairs/s")
    ap.add_argument("--compare_steps", type=int, default=5)
    ap.add_argument("--save_step", type=int, default=15, help="FSDP2/ZeRO-3: checkpoint here, then resume from it")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--max_length", type=int, default=2048)
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--run_timeout", type=int, default=240)
    ap.add_argument("--workdir", default="/tmp/bench_multi_gpu")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    os.makedirs(args.out, exist_ok=True)
    csv_path = args.csv or os.path.join(args.out, "bench_multi_gpu.csv")

    import torch

    ngpu = torch.cuda.device_count()
    n_pairs = args.pairs * 2 * (args.steps + 1)
    _, _, run_yaml = prepare(args.workdir, args.model, args.shape, n_pairs, args)
    half = max(1, args.pairs // 2)
    results = []
    for topo in args.runs:
        t1 = "single_gpu" if topo == "ddp" else topo
        # 1 GPU: the reference for both the loss comparison and the throughput ratio.
        ref_steps = args.steps if args.ref_steps is None else args.ref_steps
        one = (launch(f"{topo}-1gpu-bs{args.pairs}", t1, 1, args.pairs, ref_steps, run_yaml, args.workdir, args, [])
               if ref_steps else {"name": "-", "scalars": {}, "pairs_per_s": float("nan")})  # 0: skip it
        if ref_steps:
            results.append(one)
        if ngpu < 2:
            continue
        # 2 GPUs, same global batch: the losses must match the 1-GPU run.
        save = [] if topo == "ddp" else ["--save_strategy", "steps", "--save_steps", str(args.save_step)]
        same = launch(f"{topo}-2gpu-bs{half}", topo, 2, half, args.steps, run_yaml, args.workdir, args, save)
        same["loss_rel_diff"] = max_rel_diff(same, one, "train/loss", range(1, args.compare_steps + 1))
        same["logps_rel_diff"] = max_rel_diff(same, one, "train/logps/chosen", range(1, args.compare_steps + 1))
        same["vs"] = one["name"]
        results.append(same)
        if topo != "ddp" and same["rc"] == 0:
            # Resume from the checkpoint in a fresh output directory; the steps after it must repeat the first run's.
            ck = os.path.join(same["out_dir"], f"checkpoint-{args.save_step}")
            res = launch(f"{topo}-2gpu-bs{half}-resume", topo, 2, half, args.steps, run_yaml, args.workdir, args,
                         ["--resume_from_checkpoint", ck])
            later = range(args.save_step + 1, args.steps + 1)
            res["loss_rel_diff"] = max_rel_diff(res, same, "train/loss", later)
            res["logps_rel_diff"] = max_rel_diff(res, same, "train/logps/chosen", later)
            res["vs"] = same["name"] + f" (steps {args.save_step + 1}-{args.steps})"
            results.append(res)
            shutil.rmtree(same["out_dir"], ignore_errors=True)  # checkpoints of a 1B model + optimizer are large
        if args.no_throughput:
            continue
        # 2 GPUs, same batch per GPU: throughput scaling.
        big = launch(f"{topo}-2gpu-bs{args.pairs}", topo, 2, args.pairs, args.steps, run_yaml, args.workdir, args, [])
        big["speedup_vs_1gpu"] = big["pairs_per_s"] / one["pairs_per_s"]
        big["vs"] = one["name"]
        results.append(big)

    for topo in args.fp32_check:
        t1 = "single_gpu" if topo == "ddp" else topo
        n = args.compare_steps
        one = launch(f"{topo}-fp32-1gpu-bs{args.pairs}", t1, 1, args.pairs, n, run_yaml, args.workdir, args, [], True)
        results.append(one)
        if ngpu >= 2:
            two = launch(f"{topo}-fp32-2gpu-bs{half}", topo, 2, half, n, run_yaml, args.workdir, args, [], True)
            two["loss_rel_diff"] = max_rel_diff(two, one, "train/loss", range(1, n + 1))
            two["logps_rel_diff"] = max_rel_diff(two, one, "train/logps/chosen", range(1, n + 1))
            two["vs"] = one["name"]
            results.append(two)

    # ---- Table and CSV.
    import accelerate
    import transformers

    gpu = torch.cuda.get_device_name(0) if ngpu else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, accelerate {accelerate.__version__}"
    try:
        import deepspeed

        versions += f", deepspeed {deepspeed.__version__}"
    except Exception:
        pass
    print(f"\n# {args.model}, {args.shape} shape, {args.steps} steps, backend {args.backend}; {ngpu}x {gpu}; {versions}; {date}")
    print(f"{'run':<26}{'rc':>4}{'pairs/s':>9}{'x 1GPU':>8}{'GiB/GPU':>9}{'loss rel':>10}{'logps rel':>11}  compared with")
    fields = ["date", "gpu", "versions", "command", "name", "topology", "gpus", "per_device_bs", "global_bs", "rc",
              "wall_s", "pairs_per_s", "speedup_vs_1gpu", "peak_mem_gib_per_gpu", "loss_rel_diff", "logps_rel_diff",
              "vs"]
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in results:
            fmt = lambda k, p: f"{r[k]:.{p}g}" if k in r else "-"  # noqa: E731
            print(f"{r['name']:<26}{str(r['rc']):>4}{r['pairs_per_s']:>9.2f}{fmt('speedup_vs_1gpu', 3):>8}"
                  f"{r['peak_mem_gib_per_gpu']:>9.1f}{fmt('loss_rel_diff', 2):>10}{fmt('logps_rel_diff', 2):>11}  "
                  f"{r.get('vs', '')}")
            w.writerow(dict(r, date=date, gpu=f"{ngpu}x {gpu}", versions=versions, command=" ".join(sys.argv)))


if __name__ == "__main__":
    main()
