"""A run is never lost: staged checkpoints, resume from the newest complete one, and a clean stop on SIGTERM/SIGINT.

Each fault (a save that dies between two files, SIGKILL at a random moment, SIGTERM) is followed by a resumed run
that must reach bit-identical weights to a run that was never interrupted (CPU, float32, AdamW).
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import make_pairs, make_tokenizer, tiny_model
from datasets import Dataset
from safetensors.torch import load_file
from transformers import TrainerCallback

from prefixdpo import PrefixDPOConfig, PrefixDPOTrainer
from prefixdpo import checkpoints as ck

MAX_STEPS = 6


def _trainer(out, callbacks=None, **overrides):
    kw = dict(output_dir=str(out), report_to="none", bf16=False, use_cpu=True, per_device_train_batch_size=4,
              max_steps=MAX_STEPS, logging_steps=1, learning_rate=1e-2, save_strategy="steps", save_steps=2,
              max_length=40, disable_tqdm=True, seed=0)
    kw.update(overrides)
    return PrefixDPOTrainer(model=tiny_model("llama", seed=0), args=PrefixDPOConfig(**kw),
                            train_dataset=Dataset.from_list(make_pairs(48, seed=5, response=(1, 8))),
                            processing_class=make_tokenizer(), callbacks=callbacks)


def _weights(trainer):
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    trainer = _trainer(tmp_path_factory.mktemp("full"))
    trainer.train()
    return _weights(trainer)


class _RaiseInSave(Exception):
    pass


def test_a_save_that_dies_between_files_leaves_the_previous_checkpoint(tmp_path, uninterrupted, monkeypatch, caplog):
    out = tmp_path / "run"
    trainer = _trainer(out)
    real = PrefixDPOTrainer._save_rng_state

    def dies_at_step_4(self, output_dir):  # after the model and optimizer files, before the rng and trainer state
        if self.state.global_step == 4:
            raise _RaiseInSave("killed while saving")
        return real(self, output_dir)

    monkeypatch.setattr(PrefixDPOTrainer, "_save_rng_state", dies_at_step_4)
    with pytest.raises(_RaiseInSave):
        trainer.train()
    monkeypatch.undo()
    assert [step for step, _ in ck.checkpoint_dirs(str(out))] == [2]
    assert (out / ".staging-checkpoint-4").is_dir()  # what the dead save left: hidden, never read
    # A checkpoint folder a non-staged writer left half written, newer than the last complete one.
    (out / "checkpoint-5").mkdir()
    (out / "checkpoint-5" / "config.json").write_text("{}")
    (out / "checkpoint-5" / "optimizer.pt").write_bytes(b"")

    resumed = _trainer(out)
    with caplog.at_level(logging.WARNING, logger="prefixdpo.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert "skipping incomplete checkpoint(s)" in caplog.text and "checkpoint-5 (it has no trainer_state.json" in caplog.text
    _assert_same_weights(_weights(resumed), uninterrupted)
    assert not (out / ".staging-checkpoint-4").exists()  # the next save of that name replaced it
    assert ck.checkpoint_problem(str(out / "checkpoint-6")) == ""


def test_sigterm_saves_after_the_step_and_resumes_exactly(tmp_path, uninterrupted):
    class SigtermAt3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    out = tmp_path / "run"
    trainer = _trainer(out, callbacks=[SigtermAt3()])
    trainer.train()
    assert trainer.state.global_step == 3 and trainer.stop_on_signal.stopped_at == 3
    assert trainer.stop_on_signal.stopped_by == "SIGTERM"
    assert ck.checkpoint_problem(str(out / "checkpoint-3")) == ""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after train()
    resumed = _trainer(out)
    resumed.train(resume_from_checkpoint=True)
    _assert_same_weights(_weights(resumed), uninterrupted)


def test_staged_final_save(tmp_path):
    out = tmp_path / "model"
    trainer = _trainer(tmp_path / "run", max_steps=1, save_strategy="no")
    trainer.train()
    trainer.save_model(str(out))
    names = sorted(os.listdir(out))
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.startswith(ck.STAGING_PREFIX) for n in names)
    assert not any(n.startswith(ck.STAGING_PREFIX) for n in os.listdir(tmp_path))


def test_publish_files_moves_the_config_last(tmp_path):
    staged, target = tmp_path / ".staging-x", tmp_path / "x"
    staged.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (staged / name).write_text(name)
    moved = []
    real = os.replace
    try:
        os.replace = lambda a, b: (moved.append(os.path.basename(b)), real(a, b))[1]
        ck.publish_files(str(staged), str(target))
    finally:
        os.replace = real
    assert moved[-1] == "config.json" and not staged.exists() and sorted(os.listdir(target)) == sorted(moved)


# ---------------------------------------------------------------------------------------------------------------------
# The command line, as a scheduler sees it: real signals to a training process
# ---------------------------------------------------------------------------------------------------------------------

CPU = ["--use_cpu", "true", "--bf16", "false", "--gradient_checkpointing", "false", "--report_to", "none",
       "--disable_tqdm", "true", "--eval_strategy", "no", "--logging_steps", "1", "--learning_rate", "1e-2",
       "--per_device_train_batch_size", "4", "--max_length", "40", "--seed", "0"]


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(64, seed=7, response=(1, 8))))
    return str(path)


def _cmd(model_dir, data, out, *extra):
    return [sys.executable, "-m", "prefixdpo.cli", "train", "--model_name_or_path", model_dir, "--dataset_name", data,
            "--output_dir", str(out), *CPU, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < timeout, f"{path} did not appear"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cli_uninterrupted(tmp_path_factory, tiny_model_dir, cli_data):
    out = tmp_path_factory.mktemp("cli-full") / "run"
    proc = subprocess.run(_cmd(tiny_model_dir, cli_data, out, "--max_steps", "10", "--save_steps", "1"),
                          capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


def test_sigkill_at_random_moments_then_resume(tmp_path, tiny_model_dir, cli_data, cli_uninterrupted):
    # Checkpoints every step, so a kill lands inside a save as often as between them. Two kills, then a resume that
    # finishes; every resume starts from the newest complete checkpoint.
    rng = random.Random(1234)
    out = tmp_path / "run"
    cmd = _cmd(tiny_model_dir, cli_data, out, "--max_steps", "10", "--save_steps", "1")
    for first_wait in (out / "checkpoint-1", out / "checkpoint-5"):
        resume = ["--resume_from_checkpoint", "true"] if out.exists() else []
        proc = subprocess.Popen(cmd + resume, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
        _wait_for(first_wait, proc)
        time.sleep(rng.uniform(0.0, 1.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    done = subprocess.run(cmd + ["--resume_from_checkpoint", "true"], capture_output=True, text=True, timeout=300,
                          env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    final = load_file(str(out / "model.safetensors"))
    for k in cli_uninterrupted:
        assert torch.equal(final[k], cli_uninterrupted[k]), k


def test_sigterm_from_outside_saves_and_says_how_to_resume(tmp_path, tiny_model_dir, cli_data, cli_uninterrupted):
    out = tmp_path / "run"
    cmd = _cmd(tiny_model_dir, cli_data, out, "--max_steps", "10", "--save_strategy", "no")
    err = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
    for line in proc.stdout:  # the first logged step
        if "'loss'" in line:
            break
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 0, stderr[-3000:]
    assert "SIGTERM received: finishing this step" in stderr
    line = next(ln for ln in stdout.splitlines() if ln.startswith("Stopped by SIGTERM after step"))
    step = int(line.split("after step ")[1].split(";")[0])
    assert 1 <= step < 10 and "resume_from_checkpoint true" in line
    assert ck.checkpoint_problem(str(out / f"checkpoint-{step}")) == ""
    assert not (out / "model.safetensors").exists()  # a stopped run leaves its checkpoint, not a final model
    done = subprocess.run(cmd + ["--resume_from_checkpoint", "true", "--save_steps", "1"], capture_output=True,
                          text=True, timeout=300, env=_env())
    assert done.returncode == 0, done.stderr[-3000:]
    final = load_file(str(out / "model.safetensors"))
    for k in cli_uninterrupted:
        assert torch.equal(final[k], cli_uninterrupted[k]), k


def test_a_second_sigint_exits_at_once(tmp_path, tiny_model_dir, cli_data):
    out = tmp_path / "run"
    err_path = tmp_path / "stderr.txt"
    err = open(err_path, "w+")
    proc = subprocess.Popen(_cmd(tiny_model_dir, cli_data, out, "--max_steps", "100000", "--save_strategy", "no"),
                            stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
    for line in proc.stdout:
        if "'loss'" in line:
            break
    proc.send_signal(signal.SIGINT)
    t0 = time.time()
    while "SIGINT received" not in err_path.read_text():  # the first one was handled: the second is a new signal
        assert time.time() - t0 < 60
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    stderr = err_path.read_text()
    assert proc.returncode == 128 + signal.SIGINT and "second SIGINT: exiting now" in stderr
    assert "Traceback" not in stderr
