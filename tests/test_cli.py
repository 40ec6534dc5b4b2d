"""The command line as a user meets it: exit codes and one-line errors, no tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from preftune import __version__
from preftune.cli import main
from helpers import synthetic_pairs


@pytest.fixture()
def pairs(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(16)))
    return path


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("preftune: error:")]


def test_version_and_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "preftune", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"preftune {__version__}"


@pytest.mark.parametrize(
    "config_text, set_args, expected",
    [
        ("learning_rat: 0.1\n", [], "unknown key 'learning_rat' (did you mean 'learning_rate'?)"),
        ("beta: 0.1\n", ["--set", "bta=0.2"], "--set: unknown key 'bta' (did you mean 'beta'?)"),
        ("beta: zero\n", [], "'beta' must be a number, got 'zero'"),
        ("strategy: dpoo\n", [], "'strategy' must be one of sft, dpo, kto, orpo, simpo, cpo, reward; got 'dpoo' (did you mean 'dpo'?)"),
        ("loss_type: [sigmoid, sft]\nloss_weights: [1.0]\n", [], "loss_weights"),
    ],
)
def test_config_errors_are_one_line(tmp_path, capsys, config_text, set_args, expected):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(config_text)
    code, _, err = run(capsys, "train", str(cfg), *set_args)
    assert code == 2
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and expected in lines[0], err


def test_missing_files_and_models(tmp_path, capsys, pairs):
    code, _, err = run(capsys, "train", str(tmp_path / "none.yaml"))
    assert code == 2 and error_lines(err) == [f"preftune: error: config file not found: {tmp_path / 'none.yaml'}"]

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {tmp_path / 'missing.jsonl'}\nmodel_name: {tmp_path}\n")
    code, _, err = run(capsys, "train", str(cfg))
    assert code == 2 and len(error_lines(err)) == 1

    cfg.write_text(f"dataset: {pairs}\nmodel_name: no-such-model\noutput_dir: {tmp_path / 'out'}\n")
    code, _, err = run(capsys, "train", str(cfg))
    assert code == 2
    assert error_lines(err) == [
        "preftune: error: model not found: 'no-such-model' (not a local folder, a .gguf file, a cached hub model, "
        "or a known alias: smollm2-135m-instruct)"
    ]


def test_bad_record_in_training_data(tmp_path, capsys, tiny_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {data}\nmodel_name: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\n")
    code, _, err = run(capsys, "train", str(cfg))
    assert code == 2
    assert error_lines(err) == ["preftune: error: pairs.jsonl:2: field 'rejected' is missing"]


def test_4bit_on_cpu_is_refused_clearly(tmp_path, capsys, tiny_model_dir, pairs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"dataset: {pairs}\nmodel_name: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\nuse_4bit: true\n")
    code, _, err = run(capsys, "train", str(cfg))
    assert code == 2 and "use_4bit needs a CUDA GPU" in error_lines(err)[0]


def test_data_check_reports_and_fails_on_invalid_records(tmp_path, capsys, pairs):
    code, out, _ = run(capsys, "data", "check", str(pairs), "--format", "json")
    assert code == 0
    report = json.loads(out)
    assert report["num_pairs"] == 16 and report["invalid_records"] == 0

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n{"prompt": "p", "chosen": "", "rejected": "b"}\n')
    code, out, err = run(capsys, "data", "check", str(bad))
    assert code == 1
    lines = error_lines(err)
    assert lines[0].startswith("preftune: error: bad.jsonl:2: invalid JSON")
    assert lines[1] == "preftune: error: bad.jsonl:3: field 'chosen' is empty"
    assert "pairs" in out


def test_data_check_for_sft_files(tmp_path, capsys):
    sft = tmp_path / "sft.jsonl"
    rows = [
        {"prompt": "Say hi.", "completion": " hi there friend"},
        {"prompt": "Say hi.", "completion": " hi there friend"},  # a duplicate
        {"messages": [{"role": "user", "content": "a b"}, {"role": "assistant", "content": "c d e f"}]},
        {"text": "one two three"},
    ]
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run(capsys, "data", "check", str(sft), "--strategy", "sft", "--format", "json")
    report = json.loads(out)
    assert code == 0 and report["num_examples"] == 4 and report["invalid_records"] == 0
    assert report["shapes"] == {"completion": 2, "messages": 1, "text": 1}
    assert report["exact_duplicates"] == 1
    assert report["lengths"]["completion"]["min"] == 3 and report["lengths"]["completion"]["max"] == 4
    assert report["lengths"]["prompt"]["max"] == 2  # "Say hi." twice; messages and text have no prompt
    code, out, _ = run(capsys, "data", "check", str(sft), "--strategy", "sft")
    assert "examples                 4 (2 completion, 1 messages, 1 text)" in out
    assert "1 exact duplicate example(s) (25.0%)" in out

    sft.write_text('{"prompt": "p", "completion": "c"}\n{"messages": [{"role": "user", "content": "x"}]}\n')
    code, _, err = run(capsys, "data", "check", str(sft), "--strategy", "sft")
    assert code == 1
    assert error_lines(err) == ["preftune: error: sft.jsonl:2: field 'messages' has no assistant message to learn from"]


def test_data_check_for_kto_files_reports_the_class_balance(tmp_path, capsys):
    kto = tmp_path / "kto.jsonl"
    rows = [{"prompt": f"p{i}", "completion": f" c{i}", "label": i < 6} for i in range(8)]  # 6 desirable, 2 not
    kto.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, out, _ = run(capsys, "data", "check", str(kto), "--strategy", "kto", "--format", "json")
    report = json.loads(out)
    assert code == 0 and (report["desirable"], report["undesirable"]) == (6, 2)
    assert report["weighted_balance"] == 3.0
    # Keep undesirable_weight 1: desirable_weight = 7/6 * 2 / 6 = 0.39 puts the balance mid-band.
    assert report["warnings"] == [
        "desirable_weight x 6 desirable / (undesirable_weight x 2 undesirable) = 3.00, "
        "outside KTO's advised [1, 1.33]: try desirable_weight 0.39"
    ]
    # The config's strategy and weights are used when given.
    cfg = tmp_path / "kto.yaml"
    cfg.write_text(f"strategy: kto\ndataset: {kto}\ndesirable_weight: 0.4\n")
    code, out, _ = run(capsys, "data", "check", str(kto), "--config", str(cfg), "--format", "json")
    report = json.loads(out)
    assert abs(report["weighted_balance"] - 1.2) < 1e-12 and report["warnings"] == []

    kto.write_text('{"prompt": "p", "completion": "c", "label": "maybe"}\n')
    code, _, err = run(capsys, "data", "check", str(kto), "--strategy", "kto")
    assert code == 1
    assert error_lines(err) == [
        "preftune: error: kto.jsonl:1: field 'label' must be true (desirable) or false (undesirable), got 'maybe'"
    ]


def test_train_through_the_cli_writes_the_run(tmp_path, capsys, tiny_model_dir, pairs):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"dataset: {pairs}\nmodel_name: {tiny_model_dir}\noutput_dir: {tmp_path / 'out'}\nmax_steps: 2\n"
        "lora_r: 4\nlora_alpha: 8\nmerge_lora: true\neval_split: 0\nprogress_bar: false\n"
    )
    code, _, err = run(capsys, "train", str(cfg), "--set", "beta=0.25")
    assert code == 0, err
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]  # eval_split 0: no evaluation records
    assert "beta: 0.25" in (out / "config.resolved.yaml").read_text()
    assert (out / "final" / "adapter_model.safetensors").is_file()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out / "final_merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())


@pytest.mark.parametrize(
    "module, argv, extra",
    [
        ("fastapi", ["label", "serve", "--input", "{samples}", "--db", "{db}"], "label"),
        ("vaderSentiment", ["score", "{samples}", "--reward", "sentiment"], "sentiment"),
        ("krippendorff", ["label", "export", "--db", "{db}", "--out", "{out}"], "label"),
    ],
)
def test_a_missing_extra_stops_with_the_pip_install_to_run(capsys, monkeypatch, tmp_path, module, argv, extra):
    from preftune.label.store import LabelStore, load_items

    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"]}) + "\n")
    db = tmp_path / "labels.db"
    store = LabelStore(db, annotators_per_item=1)
    store.add_items(load_items(samples))
    monkeypatch.setitem(sys.modules, module, None)  # as if the extra were not installed
    paths = {"samples": str(samples), "db": str(db), "out": str(tmp_path / "out.jsonl")}
    code, out, err = run(capsys, *(a.format(**paths) for a in argv))
    assert code != 0 and "Traceback" not in err
    (line,) = error_lines(err)
    assert line.endswith(f"needs the '{extra}' extra ({module} is not installed): pip install 'preftune[{extra}]'")


def test_generate_at_two_temperatures_from_the_command_line(tmp_path, capsys, tiny_model_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "The sky is"}\n{"prompt": "I loved this"}\n')
    out = tmp_path / "s.jsonl"
    code, _, err = run(capsys, "generate", str(prompts), "-o", str(out), "--model", str(tiny_model_dir),
                       "--num-samples", "2", "--max-new-tokens", "4", "--temperature", "0.7", "1.0")
    assert code == 0, err
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["temperatures"] for r in records] == [[0.7, 0.7, 1.0, 1.0]] * 2
    assert records[0]["sampling"]["temperature"] == [0.7, 1.0]
    assert err.splitlines()[-1].startswith("[preftune] 8 samples for 2 prompts (0 already there) in ")
    # Without --temperature, or with one value, the records are as they always were.
    code, _, err = run(capsys, "generate", str(prompts), "-o", str(tmp_path / "one.jsonl"), "--model", str(tiny_model_dir),
                       "--num-samples", "2", "--max-new-tokens", "4")
    first = json.loads((tmp_path / "one.jsonl").read_text().splitlines()[0])
    assert code == 0 and "temperatures" not in first and first["sampling"]["temperature"] == 0.7
    assert first["completions"] == records[0]["completions"][:2]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "p.jsonl", "-o", "s.jsonl", "--top-p", "0.9", "--top-p", "0.95"],
         "preftune: error: --top-p given twice (0.9 and 0.95): it takes one value"),
        (["generate", "p.jsonl", "--output", "a.jsonl", "-o", "b.jsonl"],
         "preftune: error: -o given twice (a.jsonl and b.jsonl): it takes one value"),
        (["eval", "run", "--prompts", "p.jsonl", "--reward", "length", "--temperature", "0.5", "--temperature", "1"],
         "preftune: error: --temperature given twice (0.5 and 1.0): it takes one value"),
        (["train", "c.yaml", "--set", "beta=0.1", "--set", "beta=0.2", "--debug", "--debug"], None),
    ],
)
def test_a_single_value_flag_given_twice_is_refused(capsys, argv, message):
    if message is None:  # repeatable flags (--set) and switches stay as they were: only the parse is checked
        from preftune.cli import build_parser

        args = build_parser().parse_args(argv)
        assert args.set == ["beta=0.1", "beta=0.2"]
        # generate's --temperature takes several values, given at once or one flag each
        again = build_parser().parse_args(["generate", "p", "-o", "s", "--temperature", "0.7", "--temperature", "1.0"])
        assert again.temperature == [0.7, 1.0]
        return
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert err.splitlines() == [message]


def test_set_into_an_existing_run_names_what_differs(tmp_path, capsys, tiny_model_dir, pairs):
    cfg = tmp_path / "c.yaml"
    out = tmp_path / "out"
    cfg.write_text(
        f"dataset: {pairs}\nmodel_name: {tiny_model_dir}\noutput_dir: {out}\nmax_steps: 1\n"
        "lora_r: 0\neval_split: 0\nprogress_bar: false\n"
    )
    code, _, err = run(capsys, "train", str(cfg))
    assert code == 0, err
    code, _, err = run(capsys, "train", str(cfg), "--set", "beta=0.25", "--set", "lora_r=4")
    assert code == 2
    assert err.splitlines() == [
        f"[preftune] output_dir {out} holds a run with another config (2 keys differ):",
        "[preftune]   beta: 0.1 in that run, 0.25 in this one",
        "[preftune]   lora_r: 0 in that run, 4 in this one",
        "[preftune] to keep that run, choose a new output_dir; to replace it, set overwrite_output_dir: true (--overwrite on the command line)",
        f"preftune: error: output_dir {out} already holds a run with a different config; resume it with "
        "resume_from_checkpoint: latest, pass --overwrite to replace it, or choose another output_dir",
    ]
    print("\n".join(err.splitlines()))


def test_config_problems_are_reported_together_before_data_is_read(tmp_path, capsys):
    (tmp_path / "empty-model").mkdir()
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a"}\n')  # invalid: never reported, the data is not read
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"dataset: {data}\nmodel_name: {tmp_path / 'empty-model'}\noutput_dir: {tmp_path / 'out'}\n"
        f"provider: unsloth\nuse_4bit: true\nresume_from_checkpoint: {tmp_path / 'nowhere'}\n"
    )
    code, out, err = run(capsys, "train", str(cfg))
    assert code == 2 and out == "" and "Traceback" not in err
    assert error_lines(err) == [
        f"preftune: error: could not load model '{tmp_path / 'empty-model'}': no config.json in {tmp_path / 'empty-model'}",
        "preftune: error: provider: unsloth needs the unsloth package (pip install unsloth) and a CUDA GPU; "
        "use provider: transformers (the default) on this machine",
        "preftune: error: use_4bit needs a CUDA GPU and the bitsandbytes package; set use_4bit: false to train in full "
        "precision on this machine",
        f"preftune: error: resume_from_checkpoint: {tmp_path / 'nowhere'} does not exist",
    ]
    print("\n".join(error_lines(err)))


def test_another_runs_folder_and_a_missing_model_are_both_reported(tmp_path, capsys, tiny_model_dir, pairs):
    import preftune

    out = tmp_path / "out"
    settings = {"dataset": str(pairs), "model_name": str(tiny_model_dir), "output_dir": str(out), "max_steps": 1,
                "lora_r": 0, "eval_split": 0, "progress_bar": False}
    preftune.train(settings)
    with pytest.raises(preftune.PreftuneError) as err:
        preftune.train({**settings, "beta": 0.2, "ref_model_name": "no-such-model", "use_liger_kernel": True})
    assert err.value.problems == [  # the policy's, the reference's (its liger problem is the same), the folder's
        "use_liger_kernel: true needs the liger-kernel package (pip install liger-kernel) and a CUDA device; "
        "set use_liger_kernel: null or false here",
        "model not found: 'no-such-model' (not a local folder, a .gguf file, a cached hub model, or a known alias: "
        "smollm2-135m-instruct)",
        f"output_dir {out} already holds a run with a different config; resume it with resume_from_checkpoint: latest, "
        "pass --overwrite to replace it, or choose another output_dir",
    ]
    assert str(err.value) == "\n".join(err.value.problems)
