"""The Python API: objects in, a trained model out, the same run as the command line."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging

import datasets
import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import preftune
from conftest import build_tiny_model, build_tiny_tokenizer
from preftune.cli import main
from preftune.modelcard import read_header
from helpers import quick_settings as base_config
from helpers import synthetic_pairs

ROWS = synthetic_pairs(24)
TIMING = ("step_seconds", "tokens_per_second")


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_records(api: list[dict], cli: list[dict]) -> None:
    """Every logged value equal within 1e-6, step by step (wall-clock timings aside)."""
    assert [r["step"] for r in api] == [r["step"] for r in cli]
    for a, c in zip(api, cli):
        assert a.keys() == c.keys()
        for key in a.keys() - set(TIMING):
            assert a[key] == pytest.approx(c[key], abs=1e-6), (a["step"], key)


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(autouse=True)
def _propagate_logs():
    logging.getLogger("preftune").propagate = True


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_jsonl(path, ROWS)
    return path


def cli_run(tmp_path, model_dir, pairs_file, name: str, **overrides):
    """`preftune train` on a config file naming the model folder and the data file."""
    cfg = base_config(tmp_path, output_dir=str(tmp_path / name), model_name=str(model_dir), dataset=str(pairs_file), **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return tmp_path / name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_objects_in_give_the_cli_run(tmp_path, tiny_model_dir, pairs_file, lora):
    extra = dict(max_steps=3, lora_r=4, lora_alpha=8) if lora else dict(max_steps=3)
    cli_dir = cli_run(tmp_path, tiny_model_dir, pairs_file, "cli", **extra)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = base_config(tmp_path, output_dir=str(tmp_path / "api"), **extra)
    result = preftune.train(config, model=model, tokenizer=tokenizer, train_dataset=datasets.Dataset.from_list(ROWS))

    cli, api = read_metrics(cli_dir), read_metrics(tmp_path / "api")
    assert [r["step"] for r in cli] == [1, 2, 3, 3]
    assert_same_records(api, cli)
    assert result.output_dir == tmp_path / "api"
    assert result.metrics["loss"] == pytest.approx(cli[-2]["loss"], abs=1e-6)
    assert result.metrics["eval_loss"] == pytest.approx(cli[-1]["eval_loss"], abs=1e-6)
    assert result.history()[0]["step"] == 1 and len(result.history()) == 4
    # The model in memory is the trained one: the same weights as final/.
    if lora:
        from peft import PeftModel

        assert isinstance(result.model, PeftModel) and result.model.get_base_model() is model
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "api" / "final")
    else:
        assert result.model is model
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "api" / "final")
    trained = result.model.state_dict()
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, trained[name]), name
    resolved = yaml.safe_load((tmp_path / "api" / "config.resolved.yaml").read_text())
    assert resolved["model_name"] == str(tiny_model_dir) and resolved["dataset"] is None and resolved["bf16"] is False


def test_a_lora_peft_model_trains_its_own_adapter(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(len(tokenizer))
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    before = {k: v.clone() for k, v in peft_model.state_dict().items() if "lora_B" in k}
    # lora_r 16 in the config is replaced by the adapter's own settings, as the resolved config says.
    result = preftune.train(
        base_config(tmp_path, lora_r=16, reference="adapter"), model=peft_model, tokenizer=tokenizer, train_dataset=ROWS
    )
    assert result.model is peft_model and isinstance(result.model, PeftModel)
    after = peft_model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # the adapter trained
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if "lora_" not in name:
            assert torch.equal(tensor, frozen[name.replace(".base_layer", "")]), name  # the base did not
    resolved = yaml.safe_load((tmp_path / "run" / "config.resolved.yaml").read_text())
    assert (resolved["lora_r"], resolved["lora_alpha"], resolved["lora_target_modules"]) == (2, 4.0, ["q_proj", "v_proj"])
    assert resolved["model_name"] == "in-memory model"
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert adapter["r"] == 2
    header = read_header((tmp_path / "run" / "final" / "README.md").read_text())
    assert "base_model" not in header and header["library_name"] == "peft"


@pytest.fixture(scope="module")
def one_step_cli(tmp_path_factory, tiny_model_dir) -> list[dict]:
    """metrics.jsonl of one `preftune train` step on the pairs file, shared by the shape tests."""
    root = tmp_path_factory.mktemp("one-step")
    write_jsonl(root / "pairs.jsonl", ROWS)
    return read_metrics(cli_run(root, tiny_model_dir, root / "pairs.jsonl", "cli", max_steps=1, eval_split=0))


@pytest.mark.parametrize("shape", ["dataset", "list", "dataframe", "datasetdict"])
def test_every_input_shape_gives_the_same_run(tmp_path, tiny_model_dir, one_step_cli, shape):
    cli = one_step_cli
    data = {
        "dataset": lambda: datasets.Dataset.from_list(ROWS),
        "list": lambda: copy.deepcopy(ROWS),
        "dataframe": lambda: pd.DataFrame(ROWS),
        "datasetdict": lambda: datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}),
    }[shape]()
    result = preftune.train(
        base_config(tmp_path, model_name=str(tiny_model_dir), max_steps=1, eval_split=0), train_dataset=data
    )
    assert_same_records(read_metrics(result.output_dir), cli)


BAD = [
    (1, {"prompt": "q", "rejected": " no"}, "field 'chosen' is missing"),
    (2, {"prompt": 7, "chosen": " a", "rejected": " b"}, "field 'prompt' must be a string or a list of messages, got int"),
    (0, {"prompt": "q", "chosen": "  ", "rejected": " b"}, "field 'chosen' is empty"),
    (3, {"chosen": "xyz", "rejected": "abc"}, "no field 'prompt', and 'chosen' and 'rejected' share no beginning"),
]


@pytest.mark.parametrize("shape", ["dataset", "list", "dataframe"])
@pytest.mark.parametrize("row, record, message", BAD)
def test_bad_rows_are_named_as_the_file_readers_name_lines(tmp_path, tiny_model_dir, shape, row, record, message):
    rows = copy.deepcopy(ROWS[:6])
    rows[row] = record
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, rows)
    with pytest.raises(preftune.PreftuneError) as from_file:
        preftune.train(base_config(tmp_path, model_name=str(tiny_model_dir), dataset=str(path), output_dir=str(tmp_path / "a")))
    assert str(from_file.value).startswith(f"bad.jsonl:{row + 1}: {message}")
    if shape == "dataset" and row == 2:
        pytest.skip("a Dataset column holds one type: an int prompt among strings cannot be built")
    data = {"dataset": datasets.Dataset.from_list, "list": list, "dataframe": pd.DataFrame}[shape](rows)
    with pytest.raises(preftune.PreftuneError) as from_memory:
        preftune.train(base_config(tmp_path, model_name=str(tiny_model_dir), output_dir=str(tmp_path / "b")), train_dataset=data)
    # The same message, the row (0-based, as data[row]) where the file's names the line.
    assert str(from_memory.value) == str(from_file.value).replace(f"bad.jsonl:{row + 1}", f"train_dataset row {row}")


@pytest.mark.parametrize(
    "config, kwargs, message",
    [
        ({"learning_rat": 0.1}, {}, "config: unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ({"strategy": "dpoo"}, {}, "'strategy' must be one of sft, dpo, kto, orpo, simpo, cpo, reward; got 'dpoo'"),
        ("TRAINCONFIG", {}, "config: 'beta' must be > 0, got -1.0"),
        ({}, {"train_dataset": []}, "no records in train_dataset: the dataset is empty"),
        ({}, {"train_dataset": {"prompt": ["a"]}}, "train_dataset: expected a datasets.Dataset, a pandas DataFrame or a list of dicts, got dict"),
        ({"dataset": "x.jsonl"}, {"train_dataset": ROWS}, "train_dataset: the config names 'dataset' 'x.jsonl' too; give one of them"),
        ({}, {"eval_dataset": [{"prompt": "q", "chosen": " a"}]}, "eval_dataset row 0: field 'rejected' is missing"),
        ({}, {"model": "MODEL_DIR_STRING"}, "model: expected a transformers PreTrainedModel or a peft PeftModel, got str"),
        ({}, {"model": "TINY_MODEL"}, "tokenizer: pass tokenizer= with a model built in memory"),
        ({"strategy": "orpo"}, {"ref_model": "TINY_MODEL"}, "ref_model: strategy 'orpo' uses no reference model"),
        ({"lora_r": 4, "reference": "adapter"}, {"ref_model": "TINY_MODEL"}, "ref_model: 'reference: adapter' uses the base model itself"),
        ({"strategy": "reward"}, {"model": "TINY_MODEL", "tokenizer": "TOKENIZER"}, "model: strategy 'reward' trains a sequence classifier"),
        ({"use_4bit": True, "lora_r": 4}, {"model": "TINY_MODEL", "tokenizer": "TOKENIZER"}, "config: 'use_4bit' applies when preftune loads the model"),
        ({}, {"callbacks": [print, 3]}, "callbacks[1]: expected a function of the metrics record, got int"),
        (3.5, {}, "config: expected a dict, a path to a JSON/YAML file or a preftune.TrainConfig, got float"),
        ("missing.yaml", {}, "config file not found: missing.yaml"),
    ],
)
def test_bad_arguments_are_one_clear_error(tmp_path, tiny_model_dir, tiny_tokenizer, config, kwargs, message):
    if config == "TRAINCONFIG":
        config = preftune.TrainConfig(beta=-1.0)
    elif isinstance(config, dict):
        named = {} if "model" in kwargs else {"model_name": str(tiny_model_dir)}
        config = base_config(tmp_path, **named, **config)  # a reward config drops the keys reward models refuse
    kwargs = {k: {"TINY_MODEL": build_tiny_model(len(tiny_tokenizer)), "TOKENIZER": tiny_tokenizer,
                  "MODEL_DIR_STRING": str(tiny_model_dir)}.get(v, v) if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs.setdefault("train_dataset", ROWS)
    with pytest.raises(preftune.PreftuneError) as info:
        preftune.train(config, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_the_callers_config_tokenizer_and_reference_are_unchanged(tmp_path, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.pad_token is None  # so the run must set one, on its own copy
    side = tokenizer.padding_side
    ref_model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).train()
    ref_before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    as_dict = base_config(tmp_path, model_name=str(tiny_model_dir), reference="copy", max_steps=2, loss_type=["sigmoid", "sft"],
                          loss_weights=[1.0, 0.5])
    frozen = copy.deepcopy(as_dict)
    result = preftune.train(as_dict, tokenizer=tokenizer, ref_model=ref_model, train_dataset=ROWS)
    assert as_dict == frozen
    assert tokenizer.pad_token is None and tokenizer.padding_side == side
    assert result.tokenizer is not tokenizer and result.tokenizer.pad_token == result.tokenizer.eos_token
    assert ref_model.training and all(p.requires_grad for p in ref_model.parameters())
    assert all(torch.equal(v, ref_before[k]) for k, v in ref_model.state_dict().items())

    cfg = preftune.TrainConfig(**{**as_dict, "output_dir": str(tmp_path / "two")})
    before = dataclasses.asdict(cfg)
    preftune.train(cfg, train_dataset=ROWS)
    assert dataclasses.asdict(cfg) == before and cfg.bf16 is None  # bf16 is resolved on the run's copy


def test_a_callback_stops_the_run_and_an_exception_aborts_it(tmp_path, tiny_model_dir):
    seen: list[dict] = []

    def stop_at_two(record: dict) -> bool:
        seen.append(record)
        return record["step"] < 2

    config = base_config(tmp_path, model_name=str(tiny_model_dir), max_steps=6, eval_steps=4)
    result = preftune.train(config, train_dataset=ROWS, callbacks=[stop_at_two])
    records = read_metrics(result.output_dir)
    assert [r["step"] for r in records] == [1, 2, 2]  # two steps, then the final evaluation
    assert "eval_loss" in records[-1] and seen == records
    assert result.metrics["step"] == 2 and "eval_loss" in result.metrics
    assert (result.output_dir / "final" / "config.json").is_file()
    assert (result.output_dir / "checkpoints" / "step-2").is_dir()

    def broken(record: dict) -> None:
        raise RuntimeError("dashboard unreachable")

    with pytest.raises(RuntimeError, match="dashboard unreachable"):
        preftune.train({**config, "output_dir": str(tmp_path / "broken")}, train_dataset=ROWS, callbacks=broken)
    # The run ended: its folder is free for the next one.
    again = preftune.train({**config, "output_dir": str(tmp_path / "broken"), "overwrite_output_dir": True, "max_steps": 1},
                           train_dataset=ROWS)
    assert again.metrics["step"] == 1


KTO_ROWS = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in ROWS[:12] for k in ("chosen", "rejected")]


@pytest.mark.parametrize(
    "strategy, rows",
    [
        ("sft", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in ROWS]),
        ("kto", KTO_ROWS),
        ("orpo", ROWS),
        ("simpo", ROWS),
        ("cpo", ROWS),
        ("reward", ROWS),
    ],
)
def test_every_strategy_trains_from_objects(tmp_path, tiny_tokenizer, strategy, rows):
    if strategy == "reward":
        from transformers import LlamaConfig, LlamaForSequenceClassification

        torch.manual_seed(0)
        model = LlamaForSequenceClassification(
            LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_labels=1)
        )
    else:
        model = build_tiny_model(len(tiny_tokenizer))
    result = preftune.train(
        base_config(tmp_path, strategy=strategy, max_steps=2),
        model=model, tokenizer=tiny_tokenizer, train_dataset=pd.DataFrame(rows),
    )
    assert result.model is model and result.metrics["step"] == 2
    header = read_header((result.output_dir / "final" / "README.md").read_text())
    assert header["tags"][:2] == ["preftune", strategy]


def test_evaluate_returns_what_preftune_eval_writes(tmp_path, tiny_model_dir, pairs_file):
    run = cli_run(tmp_path, tiny_model_dir, pairs_file, "lora", lora_r=4, lora_alpha=8, max_steps=2, eval_split=0)
    test = tmp_path / "test.jsonl"
    write_jsonl(test, synthetic_pairs(6, seed=5))
    assert main(["eval", "--model", str(run), "--pairs", str(test), "-o", str(tmp_path / "cli.json")]) == 0
    written = json.loads((tmp_path / "cli.json").read_text())
    returned = preftune.evaluate(run, pairs=str(test), output=tmp_path / "api.json", progress=False)
    assert json.loads((tmp_path / "api.json").read_text()) == returned
    for result in (written, returned):
        result.pop("seconds")
    assert returned == written
    assert returned["pairs"]["num_pairs"] == 6 and 0 <= returned["pairs"]["accuracy"]["mean"] <= 1
    # A TrainResult and in-memory pairs give the same numbers.
    from_memory = preftune.evaluate(
        preftune.TrainResult(None, None, {}, run), pairs=synthetic_pairs(6, seed=5), output=tmp_path / "mem.json"
    )
    assert from_memory["pairs"]["file"] == "pairs"
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert from_memory["pairs"][key] == returned["pairs"][key]
    # Samples: prompts as plain strings, a reward as a name or as a function.
    (tmp_path / "prompts.txt").write_text("the movie was\nI think\n")
    flags = ["--num-samples", "2", "--max-new-tokens", "4", "--bootstrap", "100"]
    assert main(["eval", "--model", str(run), "--prompts", str(tmp_path / "prompts.txt"), "--reward", "length",
                 "-o", str(tmp_path / "cli_samples.json"), *flags]) == 0
    written = json.loads((tmp_path / "cli_samples.json").read_text())
    sampled = preftune.evaluate(run, prompts=["the movie was", "I think"], reward="length", num_samples=2,
                                max_new_tokens=4, bootstrap=100, output=tmp_path / "api_samples.json", progress=False)
    for result in (written, sampled):
        result.pop("seconds")
        result["samples"].pop("prompts_file")
    assert sampled == written and sampled["samples"]["num_prompts"] == 2
    by_function = preftune.evaluate(run, prompts=["the movie was", "I think"], reward=lambda ps, cs: [1.0 for _ in cs],
                                    num_samples=2, max_new_tokens=4, bootstrap=100, output=tmp_path / "f.json")
    assert by_function["samples"]["reward_function"] == "<lambda>" and by_function["samples"]["reward"]["mean"] == 1.0


def test_the_model_card_names_the_base_and_how_it_was_made(tmp_path, tiny_model_dir, pairs_file):
    run = cli_run(tmp_path, tiny_model_dir, pairs_file, "card", lora_r=4, lora_alpha=8, max_steps=2)
    text = (run / "final" / "README.md").read_text()
    header = read_header(text)
    assert header["base_model"] == str(tiny_model_dir)
    assert header["library_name"] == "peft" and header["tags"] == ["preftune", "dpo", "sigmoid", "lora"]
    assert "datasets" not in header  # a local file is not a hub dataset
    assert f"preftune train {tmp_path / 'card.yaml'}" in text
    last = read_metrics(run)
    assert f"| `eval_loss` | {last[-1]['eval_loss']:.6g} |" in text and f"| `loss` | {last[-2]['loss']:.6g} |" in text
    assert "- loss: DPO loss `sigmoid`, beta 0.1" in text


def test_collection_functions_equal_the_commands(tmp_path, tiny_model_dir):
    prompts = ["the movie was", "the film is", "I think"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    samples_file, pairs_file = tmp_path / "samples.jsonl", tmp_path / "pairs.jsonl"
    sampling = ["--num-samples", "3", "--max-new-tokens", "5", "--seed", "1"]
    assert main(["generate", str(tmp_path / "prompts.txt"), "-o", str(samples_file), "--model", str(tiny_model_dir), *sampling]) == 0
    assert main(["score", str(samples_file), "--reward", "length"]) == 0
    assert main(["pairs", str(samples_file), "-o", str(pairs_file), "--strategy", "all-pairs"]) == 0

    samples = preftune.generate(str(tiny_model_dir), prompts, num_samples=3, max_new_tokens=5, seed=1, progress=False)
    scored = preftune.score(samples, "length", progress=False)
    assert scored == [json.loads(line) for line in samples_file.read_text().splitlines()]
    pairs = preftune.build_pairs(scored, strategy="all-pairs")
    assert pairs == [json.loads(line) for line in pairs_file.read_text().splitlines()]
    # A loaded model with its tokenizer samples the same; a plain function is a reward.
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    again = preftune.generate(model, prompts, tokenizer=AutoTokenizer.from_pretrained(tiny_model_dir), num_samples=3,
                              max_new_tokens=5, seed=1, progress=False)
    assert [s["completions"] for s in again] == [s["completions"] for s in samples]
    by_function = preftune.score(again, lambda ps, cs: [float(len(c.split())) for c in cs], progress=False)
    assert [s["scores"] for s in by_function] == [s["scores"] for s in scored]
    with pytest.raises(preftune.PreftuneError, match="records row 1: field 'completions' must be a list of strings"):
        preftune.score([samples[0], {"prompt": "p", "completions": "one"}], "length")
    with pytest.raises(preftune.PreftuneError, match="^records: no pairs: 0 pairs from 1 prompts; skipped 1 ties"):
        preftune.build_pairs([{"prompt": "p", "completions": ["a", "b"], "scores": [1.0, 1.0]}])
    with pytest.raises(preftune.PreftuneError, match="records row 0: field 'scores' is missing"):
        preftune.build_pairs(samples)


def test_the_package_exports_a_documented_api_and_logs_without_printing():
    import subprocess
    import sys

    check = "import logging, preftune; print([type(h).__name__ for h in logging.getLogger('preftune').handlers])"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['NullHandler']"
    for name in preftune.__all__:
        obj = getattr(preftune, name)
        if name != "__version__":
            assert obj.__doc__ and "Example" in obj.__doc__, name


def test_the_python_api_example_runs_end_to_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import runpy

    from test_docs import ROOT

    out = tmp_path / "example"
    monkeypatch.setattr("sys.argv", ["python_api.py", "--model", str(tiny_model_dir), "--steps", "2", "--output-dir", str(out)])
    runpy.run_path(str(ROOT / "examples" / "python_api.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert "step 1: loss 0.6931, margin +0.0000" in printed
    assert "trained: PeftModelForCausalLM" in printed and "held-out preference accuracy" in printed
    assert "mean sentiment of fresh samples" in printed and f"base_model: {tiny_model_dir}" in printed
    assert json.loads((out / "eval.json").read_text())["pairs"]["num_pairs"] == 32


def test_a_base_model_trained_with_lora_goes_on_as_its_peft_model(tmp_path, tiny_tokenizer):
    model = build_tiny_model(len(tiny_tokenizer))
    config = base_config(tmp_path, lora_r=2, lora_alpha=4, max_steps=1, eval_split=0)
    first = preftune.train(config, model=model, tokenizer=tiny_tokenizer, train_dataset=ROWS)
    with pytest.raises(preftune.PreftuneError, match="pass that run's result.model"):
        preftune.train({**config, "output_dir": str(tmp_path / "again")}, model=model, tokenizer=tiny_tokenizer, train_dataset=ROWS)
    second = preftune.train({**config, "output_dir": str(tmp_path / "next")}, model=first.model, tokenizer=tiny_tokenizer,
                            train_dataset=ROWS)
    assert second.model is first.model and second.metrics["step"] == 1


def test_the_card_lists_the_hub_datasets_it_knows(tmp_path, pairs_file):
    from preftune.config import from_dict
    from preftune.data import dataset_names, in_memory_records
    from preftune.modelcard import render

    loaded = datasets.Dataset.from_list(ROWS, info=datasets.DatasetInfo(dataset_name="owner/prefs"))
    assert dataset_names(in_memory_records(loaded, "train_dataset")) == ["owner/prefs"]
    assert dataset_names(in_memory_records(ROWS, "train_dataset")) == []
    assert dataset_names("owner/prefs") == ["owner/prefs"] and dataset_names(str(pairs_file)) == [] and dataset_names(None) == []
    cfg = from_dict({"strategy": "kto", "model_name": "smollm2-135m-instruct", "lora_r": 0})
    card = render(cfg, train_metrics={"step": 3, "loss": 0.5}, eval_metrics={}, origin="preftune train kto.yaml",
                  datasets=["owner/prefs"])
    assert read_header(card) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["preftune", "kto"],
        "datasets": ["owner/prefs"],
    }
    assert "Evaluation" not in card and "| `loss` | 0.5 |" in card and "AutoModelForCausalLM.from_pretrained" in card


def test_generate_at_several_temperatures_equals_the_command(tmp_path, tiny_model_dir):
    prompts = ["the movie was", "I think"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    out = tmp_path / "samples.jsonl"
    argv = ["generate", str(tmp_path / "prompts.txt"), "-o", str(out), "--model", str(tiny_model_dir),
            "--num-samples", "2", "--max-new-tokens", "5", "--temperature", "1.0", "0.5"]
    assert main(argv) == 0
    samples = preftune.generate(str(tiny_model_dir), prompts, num_samples=2, max_new_tokens=5, temperature=[1.0, 0.5], progress=False)
    assert samples == [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["temperatures"] for s in samples] == [[1.0, 1.0, 0.5, 0.5]] * 2
