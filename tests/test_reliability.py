"""A crash, a signal, a damaged file or a bad batch costs minutes, never the run."""

from __future__ import annotations

import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from preftune import checkpoint
from preftune.errors import PreftuneError
from helpers import make_config, read_metrics, train

pytestmark = pytest.mark.usefixtures("_propagate_logs")

CONFIG = """\
model_name: {model}
dataset: {data}
output_dir: {out}
max_steps: {steps}
per_device_train_batch_size: 4
learning_rate: 5e-3
lr_scheduler_type: cosine
warmup_ratio: 0.2
logging_steps: 1
save_steps: 1
save_total_limit: 2
lora_r: 0
eval_split: 8
eval_steps: 5
max_seq_length: 64
progress_bar: false
seed: 11
"""


def write_config(path, model, data, out, steps):
    path.write_text(CONFIG.format(model=model, data=data, out=out, steps=steps))
    return path


def training_records(out):
    return [r for r in read_metrics(out)]


def progress(out) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def assert_same_run(a_dir, b_dir, atol=1e-6):
    a, b = training_records(a_dir), training_records(b_dir)
    assert [(r["step"], "eval_loss" in r) for r in a] == [(r["step"], "eval_loss" in r) for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss", "grad_norm", "learning_rate", "rewards/margins"):
            if key in x:
                assert abs(x[key] - y[key]) <= atol, (key, x, y)
    wa = load_file(str(a_dir / "final" / "model.safetensors"))
    wb = load_file(str(b_dir / "final" / "model.safetensors"))
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=atol, rtol=0), name


def test_chaos_kill_at_random_moments_then_resume(tmp_path, tiny_model_dir, pairs_file):
    """SIGKILL at 5 random moments (mid-step, mid-checkpoint, mid-log), resume each time with
    `latest`: the run ends with the same metrics and weights as an uninterrupted one."""
    steps = 60  # enough that five restarts cannot finish it however fast the machine
    reference = tmp_path / "uninterrupted"
    from preftune.config import load_config

    train(load_config(write_config(tmp_path / "ref.yaml", tiny_model_dir, pairs_file, reference, steps)))

    out = tmp_path / "chaos"
    cfg = write_config(tmp_path / "chaos.yaml", tiny_model_dir, pairs_file, out, steps)
    command = [sys.executable, "-m", "preftune", "train", str(cfg), "--set", "resume_from_checkpoint=latest"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rng = random.Random(1234)
    kills = 0
    while kills < 5:
        before = progress(out)
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # Wait until this process is training (a new metrics line), then strike at a random moment.
        deadline = time.time() + 120
        while progress(out) <= before and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.15))
        if proc.poll() is not None:  # finished before the blow landed
            assert proc.returncode == 0, proc.stderr.read()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert kills == 5, "the run finished before five kills landed"
    assert_same_run(reference, out)


def test_damaged_latest_checkpoint_falls_back_with_a_warning(tmp_path, tiny_model_dir, pairs_file, caplog):
    cfg = make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=4, save_steps=1, save_total_limit=None)
    train(cfg)
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [1, 2, 3, 4]
    assert checkpoint.verify(run / "checkpoints" / "step-4") is None
    with open(run / "checkpoints" / "step-4" / "optimizer.pt", "r+b") as f:  # one flipped byte
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    (run / "checkpoints" / "step-3" / "manifest.json").unlink()  # as if killed before sealing
    caplog.set_level("WARNING", logger="preftune")
    assert checkpoint.find_checkpoint(run, "latest") == run / "checkpoints" / "step-2"
    assert "step-4 is damaged (optimizer.pt does not match its checksum)" in caplog.text
    assert "step-3 is damaged (no manifest.json (incomplete))" in caplog.text
    with pytest.raises(PreftuneError, match="is not a usable checkpoint: optimizer.pt does not match its checksum"):
        checkpoint.find_checkpoint(run, str(run / "checkpoints" / "step-4"))


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, tiny_model_dir, pairs_file):
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, pairs_file, out, 400)
    cfg.write_text(cfg.read_text().replace("save_steps: 1", "save_steps: 1000"))
    proc = subprocess.Popen([sys.executable, "-m", "preftune", "train", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while progress(out) < 3 and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    line = [x for x in err.splitlines() if x.startswith("preftune: error:")][-1]
    assert "stopped by SIGTERM after step" in line and "checkpoint saved" in line
    saved = checkpoint.find_checkpoint(out, "latest")
    step = int(saved.name.split("-")[1])
    assert 0 < step < 400 and checkpoint.verify(saved) is None
    assert max(r["step"] for r in read_metrics(out)) == step


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    import preftune.objectives.dpo as objectives_module
    from preftune.training.recipe import Trainer

    real = objectives_module.preference_loss
    calls = {"n": 0}
    bad_steps = {2}

    def flaky(*args, **kwargs):
        losses, c, r = real(*args, **kwargs)
        calls["n"] += 1
        if trainer_module_step["now"] in bad_steps:
            losses = losses * float("nan")
        return losses, c, r

    trainer_module_step = {"now": 0}
    original_step, original_evaluate = Trainer.train_step, Trainer.evaluate

    def train_step(self):
        trainer_module_step["now"] = self.state.step + 1
        return original_step(self)

    def evaluate(self):
        trainer_module_step["now"] = -1
        return original_evaluate(self)

    monkeypatch.setattr(objectives_module, "preference_loss", flaky)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(Trainer, "evaluate", evaluate)
    cfg = make_config(tmp_path / "a", tiny_model_dir, pairs_file, max_steps=4, save_steps=1)
    train(cfg)
    records = [r for r in read_metrics(tmp_path / "a" / "run") if "loss" in r]
    assert [r["nonfinite_skips"] for r in records] == [0, 1, 1, 1]
    assert math.isnan(records[1]["loss"])
    # Every later step is NaN: the run stops after 2 in a row; the checkpoint of step 2 (the last
    # good update) is intact and nothing later was saved.
    bad_steps.update({3, 4, 5, 6})
    cfg = make_config(tmp_path / "b", tiny_model_dir, pairs_file, max_steps=6, save_steps=1, max_nonfinite_steps=2,
                      save_total_limit=None)
    with pytest.raises(PreftuneError) as err:
        train(cfg)
    assert "loss or gradient was NaN/Inf for 2 steps in a row (through step 3); stopped. Last good checkpoint:" in str(err.value)
    assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "b" / "run")] == [1]
    bad_steps.clear()


def test_output_dir_with_another_run_is_refused(tmp_path, tiny_model_dir, pairs_file):
    train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1))
    with pytest.raises(PreftuneError, match="already holds a run with a different config; resume it"):
        train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, beta=0.3))
    train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, beta=0.3, overwrite_output_dir=True))
    # The same config again simply runs again.
    train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, beta=0.3))


def test_a_second_run_into_the_same_output_dir_is_refused_while_the_first_runs(tmp_path, tiny_model_dir, pairs_file):
    from preftune.training.recipe import Trainer

    first = Trainer(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1))
    first.setup()
    second = Trainer(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, resume_from_checkpoint="latest"))
    with pytest.raises(PreftuneError) as info:
        second.setup()
    assert str(info.value) == (
        f"output_dir {tmp_path / 'run'} is in use by another training run (pid {os.getpid()}); "
        "wait for it to finish or choose another output_dir"
    )
    first.train()  # the lock goes with the run
    train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=2, resume_from_checkpoint="latest"))
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r] == [1, 2]


def test_a_killed_run_leaves_no_stale_lock(tmp_path, tiny_model_dir, pairs_file):
    """The lock dies with its process, even under SIGKILL: nothing to clean up by hand."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from preftune.checkpoint import OutputDirLock; "
         f"lock = OutputDirLock({str(out)!r}); lock.acquire(); print('locked', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = write_config(tmp_path / "c.yaml", tiny_model_dir, pairs_file, out, 1)
        busy = subprocess.run([sys.executable, "-m", "preftune", "train", str(cfg)], capture_output=True, text=True)
        assert busy.returncode != 0
        assert busy.stderr.strip().splitlines()[-1] == (
            f"preftune: error: output_dir {out} is in use by another training run (pid {holder.pid}); "
            "wait for it to finish or choose another output_dir"
        )
        assert "Traceback" not in busy.stderr
    finally:
        holder.kill()
        holder.wait()
    lock = checkpoint.OutputDirLock(out)
    lock.acquire()  # free again: no stale lock after SIGKILL
    assert (out / ".lock").read_text() == f"{os.getpid()}\n"
    lock.release()


def test_full_disk_while_checkpointing_is_a_clear_error(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    cfg = make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=3, save_steps=1, save_total_limit=None)
    real_save = torch.save
    count = {"n": 0}

    def full_disk(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            count["n"] += 1
            if count["n"] == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(PreftuneError) as err:
        train(cfg)
    message = str(err.value)
    assert "could not write checkpoint" in message and "step-2 (No space left on device)" in message
    assert "the last complete checkpoint is" in message and message.count("step-1") == 1
    run = tmp_path / "run"
    assert [s for s, _ in checkpoint.list_checkpoints(run)] == [1]
    assert not list((run / "checkpoints").glob(".tmp-*"))
