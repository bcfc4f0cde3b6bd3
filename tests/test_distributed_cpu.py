"""Data parallel on the CPU: two processes (torchrun, gloo) through the same trainer code paths that run on GPUs.

The GPU runs (DDP, FSDP2, ZeRO-3 on 2 GPUs) need GPUs; these check what a CPU can: the
collectives our trainer adds line up across processes, and the same global batch gives the same training.
"""

import json
import math
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(__file__), "ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, nproc, *args, env_extra=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / f"{name}.json"
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())] if nproc > 1 else [sys.executable])
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    res = subprocess.run(cmd + [WORKER, str(out), *map(str, args)], capture_output=True, text=True, env=env,
                         timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text())




def test_two_processes_equal_one_with_the_same_global_batch(tmp_path):
    one = launch(tmp_path, "one", 1, 8, 1)  # 8 pairs per step in one process
    two = launch(tmp_path, "two", 2, 4, 1)  # 4 + 4 pairs per step in two processes
    assert len(one["logs"]) == len(two["logs"]) == 3
    for x, y in zip(one["logs"], two["logs"]):
        for k in ("loss", "logps/chosen", "logps/rejected", "num_tokens"):
            assert y[k] == pytest.approx(x[k], rel=1e-5), k
    for p, q in zip(one["weights"], two["weights"]):
        for u, v in zip(p, q):
            assert math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-6)


def test_reentrant_checkpointing_under_two_processes_trains_as_without_it(tmp_path):
    # PrefixDPOConfig checkpoints reentrantly by default; under DDP that needs find_unused_parameters off (transformers
    # sets it so with checkpointing). Same steps as one process without checkpointing.
    plain = launch(tmp_path, "plain", 1, 8, 1)
    two = launch(tmp_path, "two-ckpt", 2, 4, 1, env_extra={"DDP_WORKER_CHECKPOINTING": "1"})
    assert plain["checkpointing"] is None and two["checkpointing"] == {"use_reentrant": True}
    assert len(plain["logs"]) == len(two["logs"]) == 3
    for x, y in zip(plain["logs"], two["logs"]):
        for k in ("loss", "logps/chosen", "logps/rejected"):
            assert y[k] == pytest.approx(x[k], rel=1e-5), k
    for p, q in zip(plain["weights"], two["weights"]):
        for u, v in zip(p, q):
            assert math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-6)


def test_token_budget_under_two_processes(tmp_path):
    # Micro-batches of different pair counts on the two processes: TRL's per-pair gathers must not deadlock or
    # mismatch, and the step's pairs are those of both processes.
    two = launch(tmp_path, "tb", 2, 1, 1, "token_budget", 200)
    logs = two["logs"]
    assert len(logs) == 3 and all(math.isfinite(h["loss"]) for h in logs)
    assert all(0 < h["batching/row_fill"] <= 1 for h in logs)
    assert logs[-1]["rewards/margins"] != 0.0


def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path):
    # A scheduler may signal one process before the others: both still stop after the same step, save one checkpoint
    # together, and a resumed run ends with the weights of a run never stopped.
    import torch

    steps = {"DDP_WORKER_MAX_STEPS": "4"}
    full = launch(tmp_path / "full", "full", 2, 4, 1, env_extra=steps)
    stop = launch(tmp_path / "run", "stop", 2, 4, 1,
                  env_extra={**steps, "DDP_WORKER_SIGTERM_AT": "2", "DDP_WORKER_SIGTERM_RANK": "1"})
    assert stop["global_step"] == 2 and stop["stopped_at"] == 2  # process 0 was never signalled itself
    assert (tmp_path / "run" / "checkpoint-2" / "trainer_state.json").exists()
    assert (tmp_path / "run" / "checkpoint-2" / "rng_state_1.pth").exists()  # both processes wrote into it
    resumed = launch(tmp_path / "run", "resumed", 2, 4, 1, env_extra={**steps, "DDP_WORKER_RESUME": "1"})
    assert resumed["global_step"] == 4 == full["global_step"]
    a, b = torch.load(tmp_path / "full" / "full.json.pt"), torch.load(tmp_path / "run" / "resumed.json.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prompt_grouping_under_two_processes_deals_whole_micro_batches(tmp_path):
    # Grouped micro-batches of 4 pairs: two processes take micro-batches 0 and 1 of the epoch's order in a step, as
    # one process accumulating two micro-batches does; the same order on both processes, so the same training.
    env = {"DDP_WORKER_DATA": "all_pairs"}
    one = launch(tmp_path, "grouped-one", 1, 4, 2, env_extra=env)
    two = launch(tmp_path, "grouped-two", 2, 4, 1, env_extra=env)
    assert len(one["logs"]) == len(two["logs"]) == 3
    for x, y in zip(one["logs"], two["logs"]):
        for k in ("loss", "logps/chosen", "logps/rejected", "num_tokens"):
            assert y[k] == pytest.approx(x[k], rel=1e-5), k
        assert y["prefix_sharing/responses_deduplicated_frac"] > 0.2
    for p, q in zip(one["weights"], two["weights"]):
        for u, v in zip(p, q):
            assert math.isclose(u, v, rel_tol=1e-5, abs_tol=1e-6)


def test_fsdp2_policy_keeps_log_probs_in_fp32():
    # accelerate's FSDP2 bf16 policy (before 1.16) casts every module output to bf16; on two H200s that rounded the summed
    # log-probs to 8 bits (rewards 0 or noise). The trainer drops output_dtype and keeps the rest of the policy.
    import dataclasses
    from types import SimpleNamespace

    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin

    from prefixdpo.trainer import keep_fsdp2_outputs_as_computed

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    plugin.set_mixed_precision("bf16")
    # accelerate 1.4-1.15 set output_dtype=bf16 here; 1.16 leaves it None. The policy those versions build:
    plugin.mixed_precision_policy = dataclasses.replace(plugin.mixed_precision_policy, output_dtype=torch.bfloat16)
    keep_fsdp2_outputs_as_computed(plugin)
    p = plugin.mixed_precision_policy
    assert p.output_dtype is None and p.param_dtype == torch.bfloat16 and p.reduce_dtype == torch.bfloat16
    fsdp1 = SimpleNamespace(fsdp_version=1, mixed_precision_policy=SimpleNamespace(output_dtype=torch.bfloat16))
    keep_fsdp2_outputs_as_computed(fsdp1)  # FSDP1 has no output cast of this kind: left alone
    assert fsdp1.mixed_precision_policy.output_dtype == torch.bfloat16
    keep_fsdp2_outputs_as_computed(None)  # not FSDP


def test_fsdp_ram_efficient_loading_with_a_loaded_reference_is_refused(monkeypatch):
    from types import SimpleNamespace

    from prefixdpo.trainer import _check_fsdp_reference_loading

    args = SimpleNamespace(precompute_ref_log_probs=False)
    _check_fsdp_reference_loading("some/model", None, args, None)  # not under FSDP: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading: false"):
        _check_fsdp_reference_loading("some/model", None, args, None)
    _check_fsdp_reference_loading("some/model", None, args, object())  # LoRA: the reference is the policy
    _check_fsdp_reference_loading("some/model", None, SimpleNamespace(precompute_ref_log_probs=True), None)
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    _check_fsdp_reference_loading("some/model", None, args, None)


def test_fsdp_loads_models_without_device_map(monkeypatch):
    # TRL leaves device_map="auto" for a reference it loads under FSDP: each process spread it over every GPU.
    from types import SimpleNamespace

    from prefixdpo.trainer import _place_models_on_the_process_device

    args = SimpleNamespace(model_init_kwargs={"dtype": "bfloat16"}, fsdp="")
    _place_models_on_the_process_device(args, None)
    assert "device_map" not in args.model_init_kwargs  # not FSDP: TRL's own rules
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    _place_models_on_the_process_device(args, None)
    assert args.model_init_kwargs == {"dtype": "bfloat16", "device_map": None}
    quantized = SimpleNamespace(model_init_kwargs=None, fsdp="")
    _place_models_on_the_process_device(quantized, object())  # k-bit: the user's device map rules
    assert quantized.model_init_kwargs is None
    mine = SimpleNamespace(model_init_kwargs={"device_map": {"": 0}}, fsdp="")
    _place_models_on_the_process_device(mine, None)  # an explicit choice is kept
    assert mine.model_init_kwargs == {"device_map": {"": 0}}
