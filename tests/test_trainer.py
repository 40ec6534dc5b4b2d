"""The training loop end to end on a tiny seeded model: metrics, learning, accumulation, references,
checkpoints and resume."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import stat

import pytest
import torch
from safetensors.torch import load_file

from helpers import make_config, quick_settings, read_metrics, synthetic_pairs, train
from preftune.config import TrainConfig, validate
from preftune.errors import PreftuneError
from preftune.training.plan import lr_factor, step_examples
from preftune.training.recipe import Trainer

pytestmark = pytest.mark.usefixtures("_propagate_logs")


def test_schedule_and_plan_are_pure():
    assert [lr_factor(s, 10, 2, "linear") for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    assert lr_factor(2, 10, 2, "cosine") == 1.0 and lr_factor(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert lr_factor(9, 10, 0, "constant") == 1.0
    first, epoch = step_examples(10, 4, seed=1, step=0)
    third, _ = step_examples(10, 4, seed=1, step=2)
    assert len(first) == 4 and len(third) == 2 and epoch == 0
    again, epoch1 = step_examples(10, 4, seed=1, step=3)
    assert epoch1 == 1 and set(first + step_examples(10, 4, 1, 1)[0] + third) == set(range(10))


def test_first_sigmoid_step_is_ln2_and_metrics_use_trl_names(tmp_path, tiny_model_dir, pairs_file):
    cfg = make_config(tmp_path, tiny_model_dir, pairs_file, lora_r=8, lora_alpha=16, max_steps=2)
    train(cfg)
    records = read_metrics(tmp_path / "run")
    first = records[0]
    assert first["step"] == 1
    assert abs(first["loss"] - math.log(2)) < 1e-4
    for key in (
        "epoch", "loss", "learning_rate", "grad_norm", "rewards/chosen", "rewards/rejected",
        "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
        "step_seconds", "tokens_per_second",
    ):
        assert key in first, key
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert first["learning_rate"] == pytest.approx(5e-3)
    evals = [r for r in records if "eval_loss" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and "eval_rewards/accuracies" in evals[0]
    # LoRA: final/ is a PEFT adapter folder with the tokenizer beside it.
    final = tmp_path / "run" / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    assert (final / "tokenizer_config.json").is_file()
    assert (tmp_path / "run" / "config.resolved.yaml").is_file()


def test_wpo_weights_each_pair_by_hand(tmp_path, tiny_model_dir, pairs_file):
    """use_weighting: at step 1 policy = reference, so every pair's sigmoid loss is ln 2 and the
    step's loss is ln 2 times the mean of w(chosen) * w(rejected), computed here from full logits."""
    from transformers import AutoModelForCausalLM

    from preftune.training.recipe import Trainer
    from test_logprobs import naive_wpo

    trainer = Trainer(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, use_weighting=True))
    trainer.setup()
    indices, _ = step_examples(len(trainer.train_items), trainer.global_batch, trainer.cfg.seed, 0)
    pairs = [trainer.train_items[i] for i in indices]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        sums = naive_wpo(model, pairs)
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    weights = torch.exp(sums / lengths)
    pair_weights = weights[: len(pairs)] * weights[len(pairs) :]
    assert 0 < pair_weights.min() and pair_weights.max() < 1  # a real weighting, not all ones
    trainer.train()
    first = read_metrics(tmp_path / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2) * pair_weights.mean().item(), abs=1e-5)


@pytest.mark.parametrize(
    "keys, message",
    [
        ({"strategy": "kto"}, "'use_weighting' (WPO) weighs DPO's pairs; strategy is 'kto'"),
        ({"loss_type": ["sigmoid", "aot"]}, "'use_weighting' cannot weigh the aot losses"),
    ],
)
def test_wpo_refuses_what_it_cannot_weigh(tmp_path, tiny_model_dir, pairs_file, keys, message):
    from preftune.errors import PreftuneError

    with pytest.raises(PreftuneError, match="^config: " + re.escape(message)):
        make_config(tmp_path, tiny_model_dir, pairs_file, use_weighting=True, **keys)


def test_learns_a_synthetic_preference(tmp_path, tiny_model_dir, pairs_file):
    from transformers import AutoModelForCausalLM

    cfg = make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=30, eval_steps=10, learning_rate=3e-3)
    result = train(cfg)
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert result["eval_rewards/accuracies"] >= 0.9
    assert evals[-1]["eval_loss"] < math.log(2)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")  # a full model folder
    assert model.config.vocab_size > 0


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def test_gradient_accumulation_equals_the_big_batch(tmp_path, tiny_model_dir, pairs_file):
    # A large Adam epsilon makes each update linear in the gradient, so equal weights mean equal
    # gradients (with the default 1e-8, fp32 noise on near-zero gradients flips update signs).
    a = make_config(tmp_path / "a", tiny_model_dir, pairs_file, per_device_train_batch_size=4, max_steps=3, adam_epsilon=1.0)
    b = make_config(
        tmp_path / "b", tiny_model_dir, pairs_file, per_device_train_batch_size=1, gradient_accumulation_steps=4,
        max_steps=3, adam_epsilon=1.0,
    )
    train(a)
    train(b)
    ra = [r for r in read_metrics(tmp_path / "a" / "run") if "eval_loss" not in r]
    rb = [r for r in read_metrics(tmp_path / "b" / "run") if "eval_loss" not in r]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    wa, wb = final_weights(tmp_path / "a" / "run"), final_weights(tmp_path / "b" / "run")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-5), name


def test_lora_with_disabled_adapter_reference(tmp_path, tiny_model_dir, pairs_file):
    cfg = make_config(tmp_path, tiny_model_dir, pairs_file, lora_r=4, lora_alpha=8, max_steps=3, reference="adapter")
    trainer = Trainer(cfg)
    trainer.setup()
    assert trainer.reference_kind == "adapter"
    trainer.train()
    # Training moved the adapter, yet the reference is still the untouched base model.
    from preftune.batching import collate_pairs
    from preftune.logprobs import CompletionLogprobs, completion_logps
    from transformers import AutoModelForCausalLM

    batch = collate_pairs(trainer.train_items[:4], trainer.pad_id)
    base = CompletionLogprobs(AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())
    with torch.no_grad():
        expected = completion_logps(base, batch).sums
        policy = completion_logps(trainer.inner, batch).sums
    chosen, rejected = trainer.reference.logps(batch)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=1e-5)
    assert not torch.allclose(policy, expected, atol=1e-4)


def test_precomputed_reference_is_cached_and_reused(tmp_path, tiny_model_dir, pairs_file, caplog):
    caplog.set_level(logging.INFO, logger="preftune")
    first = make_config(tmp_path / "one", tiny_model_dir, pairs_file, reference="precomputed", max_steps=2,
                        cache_dir=str(tmp_path / "cache"))
    train(first)
    assert "precomputed reference log-probs for 48 pairs" in caplog.text
    assert "reusing" not in caplog.text
    caplog.clear()
    second = make_config(tmp_path / "two", tiny_model_dir, pairs_file, reference="precomputed", max_steps=2,
                         cache_dir=str(tmp_path / "cache"))
    train(second)
    assert "reusing precomputed reference log-probs" in caplog.text
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 1
    # Same numbers as a live frozen copy of the reference.
    live = make_config(tmp_path / "three", tiny_model_dir, pairs_file, reference="copy", max_steps=2)
    train(live)
    for run in ("one", "two"):
        for x, y in zip(read_metrics(tmp_path / run / "run"), read_metrics(tmp_path / "three" / "run")):
            key = "loss" if "loss" in x else "eval_loss"
            assert x[key] == pytest.approx(y[key], abs=1e-5)
    # A different truncation is different data: a new cache entry, never the stale one.
    third = make_config(tmp_path / "four", tiny_model_dir, pairs_file, reference="precomputed", max_steps=1,
                        max_seq_length=20, cache_dir=str(tmp_path / "cache"))
    train(third)
    assert len(list((tmp_path / "cache" / "reference").glob("*.safetensors"))) == 2


@pytest.mark.parametrize(
    "strategy, extra",
    [("dpo", {}), ("sft", {"packing": True}), ("kto", {}), ("orpo", {}), ("reward", {})],
)
def test_resume_continues_exactly(tmp_path, tiny_model_dir, pairs_file, strategy, extra):
    """Each strategy's step state (SFT's packed rows, KTO's reference point, ...) survives a resume."""
    full = make_config(
        tmp_path / "full", tiny_model_dir, pairs_file, max_steps=6, save_steps=2, save_total_limit=None,
        strategy=strategy, **extra,
    )
    train(full)
    run = tmp_path / "full" / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    # Pretend the run died just after step 4's checkpoint: a copy without what came later.
    crashed = tmp_path / "crashed" / "run"
    shutil.copytree(run, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-6")
    shutil.rmtree(crashed / "final")
    resumed = make_config(
        tmp_path / "crashed", tiny_model_dir, pairs_file, max_steps=6, save_steps=2, save_total_limit=None,
        resume_from_checkpoint="latest", strategy=strategy, **extra,
    )
    train(resumed)
    a, b = read_metrics(run), read_metrics(crashed)
    assert [r["step"] for r in b if "eval_loss" not in r] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert x["step"] == y["step"]
        assert x.get("loss", x.get("eval_loss")) == pytest.approx(y.get("loss", y.get("eval_loss")), abs=1e-6)
    wa, wb = final_weights(run), final_weights(crashed)
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name


def test_shared_prompt_path_gives_the_plain_path_loss_curve(tmp_path, tiny_model_dir, pairs_file):
    kwargs = dict(max_steps=5, adam_epsilon=1.0, reference="copy")
    train(make_config(tmp_path / "shared", tiny_model_dir, pairs_file, share_prompt=True, **kwargs))
    train(make_config(tmp_path / "plain", tiny_model_dir, pairs_file, share_prompt=False, **kwargs))
    a, b = read_metrics(tmp_path / "shared" / "run"), read_metrics(tmp_path / "plain" / "run")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        for key in ("loss", "eval_loss", "rewards/margins", "logps/chosen", "grad_norm"):
            if key in x:
                assert x[key] == pytest.approx(y[key], abs=1e-5, rel=1e-5), (key, x[key], y[key])
    # The shared layout reads each prompt once: fewer real tokens for the same pairs.
    assert a[0]["tokens_per_second"] * a[0]["step_seconds"] < b[0]["tokens_per_second"] * b[0]["step_seconds"]


def test_flex_attention_training_on_cpu_is_one_line(tmp_path, tiny_model_dir, pairs_file):
    cfg = make_config(tmp_path, tiny_model_dir, pairs_file, attn_implementation="flex_attention")
    with pytest.raises(PreftuneError, match=r"^attn_implementation: flex_attention trains only on a GPU .*use sdpa on this machine$"):
        train(cfg)


def test_functional_dropout_rates_are_disabled(tiny_tokenizer):
    """Models that keep a dropout rate on the module (OPT) or drop layers (`layerdrop`) agree with
    their eval-mode selves in training mode once dropout is disabled."""
    from transformers import OPTConfig, OPTForCausalLM

    from preftune.training.recipe import disable_dropout

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=4, word_embed_proj_dim=32, dropout=0.5, layerdrop=0.5))
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
        disable_dropout(model)
        got = model.train()(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-6)


def test_copy_reference_takes_the_policys_precision(tmp_path, tiny_model_dir, pairs_file, monkeypatch):
    """A full fine-tune under bf16 keeps fp32 weights with bf16 autocast; the copy reference is
    loaded the same way, so both compute the same step-0 log-probs: loss ln 2 exactly."""
    monkeypatch.setattr("preftune.training.distributed.native_cpu_bf16", lambda: True)  # bf16 runs on any CPU
    out = tmp_path / "bf16"
    trainer = Trainer(make_config(out, tiny_model_dir, pairs_file, bf16=True, reference="copy", max_steps=1, eval_split=0))
    trainer.setup()
    assert next(trainer.reference.module.parameters()).dtype == next(trainer.inner.parameters()).dtype == torch.float32
    trainer.train()
    first = read_metrics(out / "run")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)


class _Planted:
    """A pickle that runs code when loaded: what a checkpoint folder from elsewhere may hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_never_unpickles_arbitrary_objects(tmp_path, tiny_model_dir, pairs_file):
    from preftune import checkpoint

    cfg = make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=2, save_steps=1, eval_split=0)
    train(cfg)
    step1 = tmp_path / "run" / "checkpoints" / "step-1"
    state = checkpoint.load_state(step1 / "rng_state_0.pt")  # what preftune writes loads safely
    assert set(state) >= {"python", "numpy", "torch"}
    marker = tmp_path / "ran-code"
    torch.save({"state": {}, "param_groups": [], "payload": _Planted(marker)}, step1 / "optimizer.pt")
    checkpoint.write_manifest(step1, 1)  # a planted file with a matching manifest
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-2")
    shutil.rmtree(tmp_path / "run" / "final")
    resume = make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=2, save_steps=1, eval_split=0,
                         resume_from_checkpoint="latest")
    with pytest.raises(PreftuneError, match=r"^checkpoint file .*optimizer\.pt holds more than tensors and plain values, so it is not loaded \(unpickling it could run code\)"):
        train(resume)
    assert not marker.exists()


def test_the_reference_pass_keeps_no_graph(tiny_model_dir, tiny_tokenizer):
    """The precomputed pass runs without autograd (a graph over the whole pass would hold every
    activation), even on a model whose parameters train."""
    from preftune.batching import truncate_pair
    from preftune.logprobs import CompletionLogprobs
    from preftune.reference import compute_logps

    from conftest import build_tiny_model

    model = build_tiny_model(len(tiny_tokenizer), seed=4)
    assert all(p.requires_grad for p in model.parameters())
    pairs = [truncate_pair(i, [5, 6, 7], [8, 9], [10], 64, 32) for i in range(3)]
    seen = []
    module = CompletionLogprobs(model)
    module.register_forward_hook(lambda mod, args, out: seen.append((torch.is_grad_enabled(), out.sums.requires_grad)))
    chosen, rejected = compute_logps(module, pairs, batch_size=2, pad_id=0, device=torch.device("cpu"))
    assert seen == [(False, False), (False, False)] and not chosen.requires_grad and chosen.shape == (3,)


def test_a_runs_files_get_the_modes_open_and_mkdir_give(tmp_path, tiny_model_dir, pairs_file):
    """Atomic writes go through mkstemp (0600); a run's files must still be readable by the group
    and others as any file `open()` writes, under the user's umask."""
    old = os.umask(0o022)
    try:
        train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=2, save_steps=1))
    finally:
        os.umask(old)
    run = tmp_path / "run"
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in sorted(run.rglob("*"))}
    print("\n".join(f"{oct(mode)} {name}" for name, mode in modes.items()))
    for name in ("metrics.jsonl", "config.resolved.yaml", "checkpoints/step-1/model/model.safetensors",
                 "checkpoints/step-1/optimizer.pt", "checkpoints/step-1/trainer_state.json",
                 "final/model.safetensors", "final/config.json"):
        assert modes[name] == 0o644, (name, oct(modes[name]))
    for name in ("checkpoints", "checkpoints/step-1", "final"):
        assert modes[name] == 0o755, (name, oct(modes[name]))
    assert {oct(m) for n, m in modes.items() if (run / n).is_file()} == {"0o644"}
    assert {oct(m) for n, m in modes.items() if (run / n).is_dir()} == {"0o755"}


def test_atomic_writes_follow_the_umask(tmp_path):
    from preftune.io import append_jsonl, make_temp_dir, write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "sub" / "a.json", "{}")
        append_jsonl(tmp_path / "b.jsonl", [{"x": 1}])
        folder = make_temp_dir(tmp_path, ".convert-")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "sub" / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "b.jsonl").stat().st_mode) == 0o640
    assert stat.S_IMODE(folder.stat().st_mode) == 0o750
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["a.json"]  # no temp file left


def test_a_precomputed_reference_file_gets_an_ordinary_mode(tmp_path):
    """safetensors writes its files 0600 whatever the umask; atomic_path gives them open()'s mode."""
    from safetensors.torch import save_file

    from preftune.io import atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "ref.safetensors") as tmp:
            save_file({"chosen": torch.zeros(2)}, str(tmp))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ref.safetensors").stat().st_mode) == 0o644


def test_each_evaluation_prints_one_line(tmp_path, tiny_model_dir, pairs_file, caplog):
    caplog.set_level(logging.INFO, logger="preftune")
    train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=4, eval_steps=2))
    lines = [r.getMessage() for r in caplog.records if " eval: " in r.getMessage()]
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert lines == [
        f"step {r['step']} eval: loss {r['eval_loss']:.4f}, acc {r['eval_rewards/accuracies']:.2f}, "
        f"margin {r['eval_rewards/margins']:.3f} (8 pairs)"
        for r in evals
    ]
    print("\n".join(lines))


def test_a_refused_output_dir_names_each_differing_key(tmp_path, tiny_model_dir, pairs_file, caplog):
    from preftune.training.rundir import config_differences

    train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1))
    caplog.clear()
    with pytest.raises(PreftuneError) as err:
        train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, beta=0.3, learning_rate=1e-3))
    run = tmp_path / "run"
    assert str(err.value) == (
        f"output_dir {run} already holds a run with a different config; resume it with resume_from_checkpoint: "
        "latest, pass --overwrite to replace it, or choose another output_dir"
    )
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert told == [
        f"output_dir {run} holds a run with another config (2 keys differ):",
        "  beta: 0.1 in that run, 0.3 in this one",
        "  learning_rate: 0.005 in that run, 0.001 in this one",
        "to keep that run, choose a new output_dir; to replace it, set overwrite_output_dir: true (--overwrite on the command line)",
    ]
    assert config_differences(run, {"beta": 0.1}, {"beta": 0.1, "loss_type": "ipo"})[:2] == [
        f"output_dir {run} holds a run with another config (1 key differs):",
        '  loss_type: (not set) in that run, "ipo" in this one',
    ]
    assert config_differences(run, None, {})[0] == f"output_dir {run} holds a run whose config.resolved.yaml cannot be read"


def test_num_threads_is_applied_shown_and_resolved(tmp_path, tiny_model_dir, pairs_file, caplog):
    import yaml

    caplog.set_level(logging.INFO, logger="preftune")
    before = torch.get_num_threads()
    try:
        train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, num_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    start = next(r.getMessage() for r in caplog.records if "training on" in r.getMessage())
    assert start.endswith("device: cpu, 1 CPU thread"), start
    assert yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())["num_threads"] == 1
    # The same config with another thread count reruns into the same folder: threads change no result.
    train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1))
    assert yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())["num_threads"] == before
    with pytest.raises(PreftuneError) as err:
        train(make_config(tmp_path, tiny_model_dir, pairs_file, max_steps=1, num_threads=0))
    assert str(err.value) == "config: 'num_threads' must be a whole number >= 1 (null: torch's default), got 0"


def test_num_threads_null_follows_omp_num_threads(tmp_path, tiny_model_dir, pairs_file):
    import subprocess
    import sys

    import yaml

    config = tmp_path / "c.yaml"
    settings = quick_settings(tmp_path, model_name=str(tiny_model_dir), dataset=str(pairs_file), max_steps=1)
    config.write_text(yaml.safe_dump(settings))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "preftune", "train", str(config)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())["num_threads"] == 1
    assert ", 1 CPU thread\n" in done.stderr


@pytest.mark.parametrize(
    "cpuinfo, native",
    [
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n", True),
        ("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n", True),
        ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n", False),
        ("processor\t: 0\nFeatures\t: fp asimd bf16\n", True),
        ("processor\t: 0\nFeatures\t: fp asimd\n", False),
        ("processor\t: 0\n", None),
        (None, None),
    ],
)
def test_native_cpu_bf16_reads_the_cpu_flags(tmp_path, cpuinfo, native):
    from preftune.training.distributed import native_cpu_bf16

    path = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        path.write_text(cpuinfo)
    assert native_cpu_bf16(path) is native


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_trains_in_fp32_and_says_so(tmp_path, tiny_model_dir, pairs_file, monkeypatch, caplog, native):
    import yaml

    monkeypatch.setattr("preftune.training.distributed.native_cpu_bf16", lambda: native)
    caplog.set_level(logging.INFO, logger="preftune")
    trainer = Trainer(make_config(tmp_path, tiny_model_dir, pairs_file, bf16=True, max_steps=1, eval_split=0))
    trainer.setup()
    trainer.train()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("bf16")]
    resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    if native:
        assert trainer.bf16 is True and resolved["bf16"] is True and said == []
    else:
        assert trainer.bf16 is False and resolved["bf16"] is False
        assert said == ["bf16: true, but this CPU has no native bfloat16 (no AVX512-BF16 or AMX): training in fp32, about 10x faster here"]
