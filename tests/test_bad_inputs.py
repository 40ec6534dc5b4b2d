"""The catalogue of bad inputs: each one ends in exactly this one line on stderr and a non-zero exit,
with no traceback. Data, config, model and command-line mistakes, as users make them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.cli import main

GOOD = {"prompt": "Is it good?", "chosen": " Yes, great.", "rejected": " No, awful."}


def jsonl(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def config(path: Path, tmp: Path, model: Path, **keys) -> Path:
    data = {"model_name": str(model), "dataset": str(jsonl(tmp / "pairs.jsonl", *[GOOD] * 12)),
            "output_dir": str(tmp / "out"), "max_steps": 1, "progress_bar": False, "eval_split": 2, **keys}
    path.write_text(json.dumps(data))
    return path


def case_data(name, records):
    def build(tmp, model):
        data = jsonl(tmp / "pairs.jsonl", *records)
        return ["data", "check", str(data)]

    return build


def case_train(file_text=None, sets=(), **keys):
    def build(tmp, model):
        path = tmp / "c.yaml"
        if file_text is not None:
            path.write_text(file_text.format(tmp=tmp, model=model))
        else:
            config(path, tmp, model, **keys)
        return ["train", str(path), *[a for s in sets for a in ("--set", s)]]

    return build


def case_custom(fn):
    return fn


def _corrupt_model(tmp, model):
    bad = tmp / "broken-model"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    return ["train", str(config(tmp / "c.yaml", tmp, bad))]


def _file_as_output_dir(tmp, model):
    (tmp / "afile").write_text("x")
    return ["train", str(config(tmp / "c.yaml", tmp, model, output_dir=str(tmp / "afile" / "out")))]


def _other_run_in_output_dir(tmp, model):
    assert main(["train", str(config(tmp / "a.yaml", tmp, model, lora_r=0))]) == 0
    return ["train", str(config(tmp / "b.yaml", tmp, model, lora_r=0, beta=0.5))]


def _missing_checkpoint(tmp, model):
    return ["train", str(config(tmp / "c.yaml", tmp, model, resume_from_checkpoint=str(tmp / "nowhere")))]


def _missing_data_file(tmp, model):
    return ["train", str(config(tmp / "c.yaml", tmp, model, dataset=str(tmp / "absent.jsonl")))]


def _kto_bad_label(tmp, model):
    data = jsonl(tmp / "unpaired.jsonl", {"prompt": "p", "completion": " c", "label": True},
                 {"prompt": "p", "completion": " c", "label": "yes"})
    return ["train", str(config(tmp / "c.yaml", tmp, model, strategy="kto", dataset=str(data)))]


def _sft_without_text(tmp, model):
    data = jsonl(tmp / "sft.jsonl", {"prompt": "p", "answer": " c"})
    return ["train", str(config(tmp / "c.yaml", tmp, model, strategy="sft", dataset=str(data)))]


def _unknown_extension(tmp, model):
    (tmp / "pairs.xml").write_text("<x/>")
    return ["data", "check", str(tmp / "pairs.xml")]


CATALOGUE = [
    # -- data --------------------------------------------------------------------------------------
    ("missing field", case_data("x", [GOOD, {"prompt": "p", "chosen": "c"}]),
     "pairs.jsonl:2: field 'rejected' is missing"),
    ("malformed JSON line", case_data("x", ['{"prompt": "p", "chosen": "c" "rejected": "r"}']),
     "pairs.jsonl:1: invalid JSON (Expecting ',' delimiter at column 31)"),
    ("wrong type", case_data("x", [{**GOOD, "rejected": 3}]),
     "pairs.jsonl:1: field 'rejected' must be a string or a list of messages, got int"),
    ("empty completion", case_data("x", [GOOD, GOOD, {**GOOD, "chosen": "  "}]),
     "pairs.jsonl:3: field 'chosen' is empty"),
    ("message without role", case_data("x", [{"prompt": [{"content": "hi"}], "chosen": "a", "rejected": "b"}]),
     "pairs.jsonl:1: field 'prompt[0]' message needs 'role' and 'content'"),
    ("record is not an object", case_data("x", ['["a", "b"]']),
     "pairs.jsonl:1: record must be an object with fields prompt/chosen/rejected, got list"),
    ("missing data file", case_custom(_missing_data_file), "data file not found: {tmp}/absent.jsonl"),
    ("unknown data format", case_custom(_unknown_extension),
     "unsupported data file type '.xml': {tmp}/pairs.xml (expected .csv, .json, .jsonl, .ndjson, .parquet, or a "
     "folder saved with datasets' save_to_disk)"),
    # -- config ------------------------------------------------------------------------------------
    ("unknown key", case_train("learning_rat: 0.1\n"),
     "{tmp}/c.yaml: unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
    ("wrong value type", case_train("per_device_train_batch_size: four\n"),
     "{tmp}/c.yaml: 'per_device_train_batch_size' must be a whole number, got 'four'"),
    ("out of range", case_train("beta: -0.1\n"), "{tmp}/c.yaml: 'beta' must be > 0, got -0.1"),
    ("unknown loss type", case_train("loss_type: sigmod\n"),
     "{tmp}/c.yaml: unknown 'loss_type' 'sigmod' (did you mean 'sigmoid'?); valid: sigmoid, robust, hinge, ipo, "
     "exo_pair, nca_pair, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sigmoid_norm, sft"),
    ("unknown --set key", case_train("beta: 0.1\n", sets=["bta=0.2"]), "--set: unknown key 'bta' (did you mean 'beta'?)"),
    ("malformed --set", case_train("beta: 0.1\n", sets=["beta"]), "--set beta: expected KEY=VALUE"),
    ("invalid YAML", case_train("beta: [0.1\n"), "{tmp}/c.yaml:2: invalid YAML (expected ',' or ']', but got '<stream end>')"),
    ("adapter reference without LoRA", case_train("reference: adapter\nlora_r: 0\n"),
     "{tmp}/c.yaml: 'reference: adapter' needs LoRA ('lora_r' > 0); use 'copy' or 'precomputed' for a full fine-tune"),
    ("no dataset", case_train("beta: 0.2\n"),
     "config: 'dataset' is required (a JSONL/JSON/Parquet/CSV file or a datasets folder)"),
    ("KTO label not a boolean", case_custom(_kto_bad_label),
     "unpaired.jsonl:2: field 'label' must be true (desirable) or false (undesirable), got 'yes'"),
    ("SFT record without text", case_custom(_sft_without_text),
     "sft.jsonl:1: record needs 'prompt' and 'completion', 'messages', 'text', or a preference pair's 'chosen'"),
    ("reference for a reference-free strategy", case_train(strategy="simpo", reference="copy"),
     "{tmp}/c.yaml: strategy 'simpo' uses no reference model, so 'reference' and 'ref_model_name' do not apply"),
    ("DPO loss for another strategy", case_train(strategy="kto", loss_type="ipo"),
     "{tmp}/c.yaml: 'loss_type', 'loss_weights' and 'rpo_alpha' choose among DPO's losses; strategy 'kto' has its own loss"),
    ("eval split too large", case_train(eval_split=12),
     "'eval_split' 12 leaves no training pairs out of 12"),
    # -- model -------------------------------------------------------------------------------------
    ("unknown model", case_train(model_name="no-such-model"),
     "model not found: 'no-such-model' (not a local folder, a .gguf file, a cached hub model, or a known alias: "
     "smollm2-135m-instruct)"),
    ("corrupt model folder", case_custom(_corrupt_model), None),
    ("4-bit on CPU", case_train(use_4bit=True),
     "use_4bit needs a CUDA GPU and the bitsandbytes package; set use_4bit: false to train in full precision on this machine"),
    ("unsloth without unsloth", case_train(provider="unsloth"), None),
    # -- files and runs ----------------------------------------------------------------------------
    ("output_dir under a file", case_custom(_file_as_output_dir),
     "output_dir {tmp}/afile/out is not writable (Not a directory)"),
    ("output_dir holds another run", case_custom(_other_run_in_output_dir),
     "output_dir {tmp}/out already holds a run with a different config; resume it with resume_from_checkpoint: "
     "latest, pass --overwrite to replace it, or choose another output_dir"),
    ("missing checkpoint", case_custom(_missing_checkpoint),
     "resume_from_checkpoint: {tmp}/nowhere does not exist"),
    ("missing config file", lambda tmp, model: ["train", str(tmp / "none.yaml")], "config file not found: {tmp}/none.yaml"),
]


@pytest.mark.parametrize("name, build, expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input(name, build, expected, tmp_path, tiny_model_dir, capsys):
    argv = build(tmp_path, tiny_model_dir)
    capsys.readouterr()
    code = main(argv)
    _, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("preftune: error: ")]
    assert len(lines) >= 1, err
    message = lines[0][len("preftune: error: "):]
    if expected is None:  # wording from a library: check the shape, not the words
        assert message.startswith(("could not load", "provider: unsloth", "unsloth")), message
        assert "\n" not in message
    else:
        assert message == expected.format(tmp=tmp_path), message
