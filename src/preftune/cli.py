"""The `preftune` command line.

Bad input ends in one line on stderr and a non-zero exit; the traceback is shown only with
`--debug`. `python -m preftune` runs the same `main`, so launchers such as
`accelerate launch -m preftune train CONFIG` work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any, Sequence

from preftune import __version__
from preftune.config import STRATEGIES
from preftune.errors import PreftuneError, require

log = logging.getLogger("preftune")

def _setup_logging(debug: bool) -> None:
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[preftune] %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG if debug else logging.INFO if rank == 0 else logging.WARNING)
    if not debug:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        # Library chatter (weight-loading bars, deprecation notes) buries the lines that matter.
        # Set through the environment, read when those libraries are first imported, so commands
        # that never load a model do not pay for importing them.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


# -- training -------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    import shlex

    from preftune.api import train
    from preftune.config import load_config
    from preftune.recipes.pipeline import has_stages

    if has_stages(args.config):
        args.configs = [args.config]
        return cmd_pipeline(args)
    overrides = list(args.set or []) + (["overwrite_output_dir=true"] if args.overwrite else [])
    cfg = load_config(args.config, overrides)
    command = ["preftune", "train", args.config, *(f"--set={o}" for o in args.set or []), *(["--overwrite"] if args.overwrite else [])]
    final = train(cfg, origin=shlex.join(command)).metrics
    summary = ", ".join(f"{k}={v:.4f}" for k, v in final.items() if k in ("loss", "eval_loss", "eval_rewards/accuracies"))
    log.info("done: %s -> %s", summary or "no steps", cfg.output_dir)
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from preftune.recipes.pipeline import load_pipeline, run_pipeline

    configs = load_pipeline(args.configs, list(args.set or []))
    for summary in run_pipeline(configs, overwrite=args.overwrite):
        shown = ", ".join(f"{k}={v:.4f}" for k, v in summary.items() if k in ("loss", "eval_loss") and isinstance(v, float))
        log.info("stage %d (%s): %s%s -> %s", summary["stage"], summary["strategy"], summary["action"],
                 f", {shown}" if shown else "", summary["output_dir"])
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from preftune.config import load_config
    from preftune.estimate import report

    cfg = load_config(args.config, args.set or [])
    print(report(cfg.model_name, cfg, args.gpu_memory, args.num_processes))
    return 0


def add_train_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """train, pipeline, estimate: the training core's commands."""
    p = sub.add_parser(
        "train",
        parents=[common],
        help="train from a JSON/YAML config",
        description="Train a model from a JSON or YAML config (see the README for every key).",
    )
    p.add_argument("config", help="config file (.yaml, .yml or .json)")
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one config key, the value parsed as YAML (repeatable): --set beta=0.2 --set lora_r=0",
    )
    p.add_argument("--overwrite", action="store_true", help="start over in an output_dir that holds another run")
    p.set_defaults(func=cmd_train)
    pl = sub.add_parser(
        "pipeline",
        parents=[common],
        help="run training stages in order (e.g. SFT then DPO)",
        description="Run stages in order, each starting from the previous stage's result (also its reference): "
        "one config with 'stages:' or one config per stage. A stage already finished with the same config is "
        "skipped, an unfinished one resumes.",
    )
    pl.add_argument("configs", nargs="+", metavar="CONFIG", help="a config with 'stages:', or one config per stage, in order")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one key in every stage (repeatable)")
    pl.add_argument("--overwrite", action="store_true", help="replace stage folders that hold runs of other configs")
    pl.set_defaults(func=cmd_pipeline)
    e = sub.add_parser(
        "estimate",
        parents=[common],
        help="predict peak GPU memory of a config, and the settings that fit a GPU",
        description="Predict peak memory per device (weights, gradients, optimizer, reference, activations) for "
        "full fine-tuning, LoRA and QLoRA, without loading weights; --gpu-memory lists the batch sizes that fit.",
    )
    e.add_argument("config", help="training config (.yaml, .yml or .json)")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key (repeatable)")
    e.add_argument("--gpu-memory", metavar="SIZE", help="memory of one GPU, e.g. 16GB or 80GiB")
    e.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="processes the model is sharded over with fsdp: full_shard (per-process memory)")
    e.set_defaults(func=cmd_estimate)


# -- data -----------------------------------------------------------------------------------------


def _visible(tokenizer: Any, ids: list[int]) -> str:
    """Token ids as text with every special token written out and newlines shown as \\n, on one line."""
    return tokenizer.decode(ids, skip_special_tokens=False).replace("\\", "\\\\").replace("\n", "\\n")


def _rendered_example(tokenizer: Any, example: Any) -> dict[str, Any]:
    """One pair in the model's exact tokens: the context generation sees, then each completion."""
    from preftune.batching import at_record, encode_completion, encode_prompt

    with at_record(example.location):
        context = encode_prompt(tokenizer, example.prompt, example.tools)
        chosen = encode_completion(tokenizer, example.prompt, example.chosen, example.tools)
        rejected = encode_completion(tokenizer, example.prompt, example.rejected, example.tools)
    return {
        "location": example.location,
        "context": _visible(tokenizer, context),
        "chosen": _visible(tokenizer, chosen),
        "rejected": _visible(tokenizer, rejected),
        "tokens": [len(context), len(chosen), len(rejected)],
    }


def _parse_columns(text: str | None) -> dict[str, str] | None:
    """`--columns prompt=question,system=system` as {preftune field: file field}."""
    if not text:
        return None
    columns: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise PreftuneError(f"--columns: expected FIELD=COLUMN pairs separated by commas, got {item.strip()!r}")
        target, source = item.split("=", 1)
        columns[target.strip()] = source.strip()
    return columns


def cmd_data_check(args: argparse.Namespace) -> int:
    from collections import Counter

    from preftune import chat
    from preftune.data import LAYOUTS, RecordLayout, check_sft_data, check_unpaired_data
    from preftune.quality import examples_report, format_examples_report, format_report

    model_name, max_seq, max_prompt = args.model, args.max_seq_length, args.max_prompt_length
    columns, system_prompt, template_kwargs, fold = _parse_columns(args.columns), args.system_prompt, None, False
    if args.chat_template_kwargs:
        template_kwargs = _json_mapping("--chat-template-kwargs", args.chat_template_kwargs)
    if args.config:
        from preftune.config import load_config

        cfg = load_config(args.config)
        model_name = model_name or cfg.model_name
        max_seq = max_seq or cfg.max_seq_length
        max_prompt = max_prompt or cfg.max_prompt_length
        columns = columns if columns is not None else cfg.columns
        system_prompt = system_prompt if system_prompt is not None else cfg.system_prompt
        template_kwargs = template_kwargs if template_kwargs is not None else cfg.chat_template_kwargs
        fold = cfg.fold_system_message
    layout = RecordLayout.make(columns, system_prompt, "--columns")
    if max_seq:
        from preftune.batching import effective_prompt_length

        max_prompt = effective_prompt_length(max_seq, max_prompt)
    strategy = args.strategy or (cfg.strategy if args.config else "dpo")
    skipped: Counter = Counter()
    if strategy in ("sft", "kto"):
        # Supervised and unpaired files: their own validation and report (lengths in words).
        if strategy == "sft":
            examples, errors = check_sft_data(args.path, args.split, layout)
            report = examples_report(examples)
        else:
            examples, errors = check_unpaired_data(args.path, args.split, layout, skipped)
            weights = (cfg.desirable_weight, cfg.undesirable_weight) if args.config else (1.0, 1.0)
            report = examples_report(examples, *weights)
        text = format_examples_report
    else:
        # Streamed: one example at a time into the report's counters, so any size fits in memory.
        from tqdm.auto import tqdm

        from preftune.data import converter, iter_checked, iter_entries
        from preftune.quality import QualityCounter

        errors = []
        counter, counts, differs, first = QualityCounter(), Counter(), 0, None
        entries = tqdm(iter_entries(args.path, args.split), desc="check", unit=" records", leave=False,
                       disable=args.format == "json" or not sys.stderr.isatty())
        for example in iter_checked(entries, converter("pairs", layout), errors, skipped):
            counter.add(example)
            counts[example.layout] += 1
            differs += bool(example.extra.get("prompt_differs"))
            first = first or example
        tokenizer = lengths = None
        if model_name and first is not None:
            from preftune.models import load_tokenizer

            tokenizer = chat.configure(load_tokenizer(model_name), template_kwargs, fold)
            if not errors:
                # Token lengths from the prepared table (cached: training on this data maps it again).
                from preftune.prepared import prepare

                data = prepare(args.path, args.split, "pairs", tokenizer, layout, progress=sys.stderr.isatty(),
                               cache_dir=cfg.cache_dir if args.config else None)
                lengths = [data.ids(name).lengths() for name in ("prompt_ids", "chosen_ids", "rejected_ids")]
        report = counter.report(lengths, max_seq, max_prompt)
        report["layouts"] = {LAYOUTS[k]: n for k, n in counts.most_common()}
        report["prompt_differs"] = differs
        if tokenizer is not None:
            report["example"] = _rendered_example(tokenizer, first)
        text = format_report
    report["mapping"] = layout.describe() + (f"; system_prompt: {json.dumps(system_prompt)}" if system_prompt else "")
    report["skipped"] = dict(skipped)
    report["invalid_records"] = len(errors)
    report["errors"] = errors[:100]
    if args.format == "json":
        print(json.dumps(report, indent=2))
    else:
        print(text(report))
    if errors:
        for message in errors[:20]:
            print(f"preftune: error: {message}", file=sys.stderr)
        if len(errors) > 20:
            print(f"preftune: error: ... and {len(errors) - 20} more invalid records", file=sys.stderr)
        return 1
    return 0


def _json_mapping(flag: str, text: str) -> dict[str, Any]:
    """A flag's JSON object (`--chat-template-kwargs '{"enable_thinking": false}'`)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreftuneError(f"{flag}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, dict):
        raise PreftuneError(f"{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def add_data_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """data check: validation and the quality report of a dataset."""
    data = sub.add_parser("data", parents=[common], help="inspect preference data")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND")
    c = data_sub.add_parser(
        "check",
        parents=[common],
        help="validate a dataset and print its quality report",
        description="Validate every record (errors name the line and field) and report duplicates, ties, "
        "length bias, prompt diversity and truncation (for SFT and KTO files: shapes, duplicates, lengths "
        "and KTO's class balance). Exits 1 when any record is invalid.",
    )
    c.add_argument("path", help="JSONL/JSON/Parquet/CSV file, a datasets folder, or a cached hub dataset name")
    c.add_argument("--format", choices=("text", "json"), default="text")
    c.add_argument("--split", default="train", help="split of a datasets folder or hub dataset (default: train)")
    c.add_argument("--model", help="count lengths in this model's tokens (default: whitespace words)")
    c.add_argument("--config", help="take model_name, max_seq_length, max_prompt_length, strategy and KTO's weights from a training config")
    c.add_argument("--columns", metavar="FIELD=COLUMN,...",
                   help="map the file's field names to preftune's, e.g. prompt=question,system=system (config: columns)")
    c.add_argument("--system-prompt", metavar="TEXT", help="a system message for every record without one")
    c.add_argument("--chat-template-kwargs", metavar="JSON",
                   help='extra chat-template variables for the rendered example, e.g. \'{"enable_thinking": false}\'')
    c.add_argument("--max-seq-length", type=int, help="report pairs that this limit would truncate")
    c.add_argument("--max-prompt-length", type=int, help="report prompts that this limit would truncate")
    c.add_argument(
        "--strategy",
        choices=STRATEGIES,
        help="what the file is for: sft (prompt/completion, messages or text), kto (prompt/completion/label) "
        "or a pairwise strategy (the default; or the --config's strategy)",
    )
    c.set_defaults(func=cmd_data_check)
    data.set_defaults(func=lambda a: data.print_help() or 2)


# -- collect --------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from preftune.collect.generation import (
        SamplingSettings,
        choose_engine,
        generate_file,
        load_generation_model,
        load_prompts,
        temperature_list,
        vllm_samplers,
    )

    temperatures = args.temperature or [0.7]
    settings = SamplingSettings(args.num_samples, temperatures[0], args.top_p, args.max_new_tokens, args.seed).check()
    temperature_list(settings, temperatures)
    prompts = load_prompts(args.prompts)
    engine = choose_engine(args.engine, args.model)
    chat = {"auto": None, "on": True, "off": False}[args.chat]
    if engine == "vllm":
        from preftune.models import load_tokenizer

        model, tokenizer = None, load_tokenizer(args.model)
        sampler = vllm_samplers(args.model, tokenizer, settings, temperatures)
    else:
        model, tokenizer = load_generation_model(args.model)
        sampler = None
    if args.chat_template_kwargs:
        from preftune import chat as chat_rendering

        chat_rendering.configure(tokenizer, _json_mapping("--chat-template-kwargs", args.chat_template_kwargs))
    summary = generate_file(
        model,
        tokenizer,
        prompts,
        args.output,
        settings,
        model_name=args.model,
        batch_size=args.batch_size,
        chat=chat,
        overwrite=args.overwrite,
        sampler=sampler,
        temperatures=temperatures,
    )
    log.info(
        "%d samples for %d prompts (%d already there) in %.1fs, %.2f samples/s -> %s",
        summary["samples"],
        summary["prompts"] - summary["skipped"],
        summary["skipped"],
        summary["seconds"],
        summary["samples_per_second"],
        args.output,
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from preftune.collect.generation import read_samples
    from preftune.io import write_jsonl_atomic
    from preftune.collect.rewards import get_reward, score_records

    records = [record for _, record in read_samples(args.samples)]
    reward = get_reward(args.reward, judge_prompt=args.judge_prompt)
    scored = score_records(reward, records, batch_size=args.batch_size)
    output = args.output or args.samples
    write_jsonl_atomic(output, scored)
    flat = [s for r in scored for s in r["scores"]]
    log.info("scored %d completions with %s (mean %.4f) -> %s", len(flat), reward.name, sum(flat) / max(1, len(flat)), output)
    _log_judge(reward)
    return 0


def _log_judge(reward: Any) -> None:
    """A judge's position figures, after it has judged (`collect.judge`)."""
    summary = getattr(reward, "summary", None)
    if callable(summary):
        log.info("%s", summary())


def cmd_pairs(args: argparse.Namespace) -> int:
    from preftune.api import build_pairs
    from preftune.io import write_jsonl_atomic

    source: Any = args.scored
    if args.reward:  # score (or judge) the samples first, in memory
        from preftune.collect.generation import read_samples
        from preftune.collect.rewards import get_reward, score_records

        reward = get_reward(args.reward, judge_prompt=args.judge_prompt)
        source = score_records(reward, [record for _, record in read_samples(args.scored)])
        _log_judge(reward)
    elif args.judge_prompt:
        raise PreftuneError("--judge-prompt needs --reward judge:MODEL")
    pairs = build_pairs(source, strategy=args.strategy, min_margin=args.min_margin, seed=args.seed)
    write_jsonl_atomic(args.output, pairs)
    log.info("%d pairs -> %s", len(pairs), args.output)
    return 0


JUDGE_HELP = (
    "a judge's prompt: a UTF-8 file with {prompt}, {response_a} and {response_b} (default: the built-in one; "
    "see the README)"
)


def add_collect_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """generate, score, pairs: preference data from a model's samples (`preftune.collect`)."""
    g = sub.add_parser(
        "generate",
        parents=[common],
        help="sample completions for prompts (resumable)",
        description="Sample N completions per prompt and write one JSONL line per prompt: prompt, completions, "
        "their token lengths, whether each stopped at EOS, and the sampling settings. Sample j of prompt i is "
        "seeded from (seed, i, j), so a rerun gives the same file, and a rerun after an interruption skips "
        "the prompts already written. String prompts go to chat models as a user message.",
    )
    g.add_argument("prompts", help="prompts: JSONL/JSON/Parquet/CSV with a 'prompt' field (text or messages), or .txt (one per line)")
    g.add_argument("-o", "--output", required=True, help="samples file to write or resume (JSONL)")
    g.add_argument("--model", default="smollm2-135m-instruct", help="model name, folder, .gguf or LoRA adapter folder (default: smollm2-135m-instruct)")
    g.add_argument("--num-samples", type=int, default=4, help="completions per prompt (default: 4)")
    g.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        action="extend",
        metavar="T",
        help="sampling temperature; 0 is greedy (default: 0.7). Several (--temperature 0.7 1.0) sample NUM_SAMPLES "
        "at each; each record then lists the temperature of each completion",
    )
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0, off)")
    g.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion at most (default: 48)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    g.add_argument(
        "--chat",
        choices=("auto", "on", "off"),
        default="auto",
        help="send string prompts as a user message through the chat template: auto = when the tokenizer has one",
    )
    g.add_argument("--chat-template-kwargs", metavar="JSON", help='extra chat-template variables, e.g. \'{"enable_thinking": false}\'')
    g.add_argument("--engine", choices=("auto", "transformers", "vllm"), default="auto", help="auto: vLLM when installed and a GPU is present")
    g.add_argument("--overwrite", action="store_true", help="start the output file afresh instead of resuming it")
    g.set_defaults(func=cmd_generate)
    sc = sub.add_parser(
        "score",
        parents=[common],
        help="add reward scores to a samples file",
        description="Score every completion of a samples file with a reward and write the file with 'scores' "
        "(one per completion) and 'reward' (its name) added.",
    )
    sc.add_argument("samples", help="samples file written by 'preftune generate'")
    sc.add_argument(
        "--reward",
        required=True,
        help="sentiment (VADER), length (words), a local reward-model folder, module:function / file.py:function, "
        "or judge:MODEL (a pairwise LLM judge: scores are each completion's mean probability of beating the prompt's others)",
    )
    sc.add_argument("--judge-prompt", metavar="FILE", help=JUDGE_HELP)
    sc.add_argument("-o", "--output", help="file to write (default: rewrite SAMPLES in place)")
    sc.add_argument("--batch-size", type=int, default=64, help="completions per reward call (default: 64)")
    sc.set_defaults(func=cmd_score)
    pa = sub.add_parser(
        "pairs",
        parents=[common],
        help="build preference pairs from scored samples",
        description="Pair each prompt's completions by score into prompt/chosen/rejected records (scores kept as "
        "chosen_score and rejected_score). Ties and pairs closer than --min-margin are skipped. With --reward the "
        "samples are scored first; with --reward judge:MODEL every two completions of a prompt are judged (in both "
        "orders) and completions rank by their mean probability of beating the others.",
    )
    pa.add_argument("scored", help="samples file with scores ('preftune score'), or without them when --reward is given")
    pa.add_argument("--reward", help="score the samples first: sentiment, length, a reward-model folder, module:function, or judge:MODEL")
    pa.add_argument("--judge-prompt", metavar="FILE", help=JUDGE_HELP)
    pa.add_argument("-o", "--output", required=True, help="pairs file to write (JSONL)")
    pa.add_argument("--strategy", default="best-worst", help="best-worst (default), all-pairs or random")
    pa.add_argument("--min-margin", type=float, default=0.0, help="smallest score difference kept (default: 0; ties always skipped)")
    pa.add_argument("--seed", type=int, default=0, help="seed of the random strategy (default: 0)")
    pa.set_defaults(func=cmd_pairs)


# -- label ----------------------------------------------------------------------------------------


def cmd_label_serve(args: argparse.Namespace) -> int:
    require("label", "fastapi", "uvicorn", "pydantic", "markdown_it", what="preftune label serve")
    from preftune.label.server import new_token, serve

    token = new_token() if args.token == "" else args.token
    serve(
        args.input, args.db, args.annotators_per_item, args.host, args.port, token,
        scale=args.scale, guidelines=args.guidelines, admin_token=args.admin_token or None,  # none given: serve makes one
    )
    return 0


def cmd_label_export(args: argparse.Namespace) -> int:
    from preftune.label.agreement import export_labels, format_agreement

    judge = None
    if args.judge:
        from preftune.collect.judge import PREFIX, make_judge

        judge = make_judge(args.judge if args.judge.startswith(PREFIX) else PREFIX + args.judge, judge_prompt=args.judge_prompt)
    elif args.judge_prompt:
        raise PreftuneError("--judge-prompt needs --judge MODEL")
    report = export_labels(args.db, args.out, args.min_annotators, args.report, args.min_strength, args.format, judge=judge)
    print(format_agreement(report))
    log.info("wrote %d pairs to %s and the report to %s", report["exported"], report["output"], report["report"])
    return 0


def add_label_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """label serve, label export: human labeling (`preftune.label`)."""
    from preftune.label.http_api import HTTP_API

    label = sub.add_parser("label", parents=[common], help="label preference pairs by hand in a web page")
    label_sub = label.add_subparsers(dest="label_command", metavar="COMMAND")
    s = label_sub.add_parser(
        "serve",
        parents=[common],
        help="serve the labeling page",
        description="Serve a web page where annotators pick the better of two responses (keys: 1 = A, 2 = B, "
        "t = tie, s = skip, u = undo, c = comment, g = guidelines; with --scale 5: 1-5 from A much better to "
        "B much better). Every judgement goes to an SQLite database; stopping and starting again loses "
        "nothing. The input file is only read. The lead's dashboard is at /admin, behind its own token.",
        epilog=HTTP_API,
        formatter_class=_KeepLaidOutText,
    )
    s.add_argument("--input", required=True, help="pairs (prompt/chosen/rejected) or samples (prompt/completions) file")
    s.add_argument("--db", required=True, help="SQLite database to keep the judgements in (created if missing)")
    s.add_argument("--annotators-per-item", type=int, default=3, help="distinct annotators each item goes to (default: 3)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    s.add_argument(
        "--token",
        nargs="?",
        const="",
        help="require this access token from annotators (given alone, a random one is made); "
        "the link to share ends in ?token=...",
    )
    s.add_argument(
        "--scale",
        type=int,
        choices=(3, 5),
        default=3,
        help="3: A / B / tie (default); 5: A much better, A slightly better, tie, B slightly better, "
        "B much better (keys 1-5), so export can keep strong pairs and pass the strength on as a margin",
    )
    s.add_argument("--guidelines", metavar="FILE.md", help="Markdown guidelines shown before the first item and on key g")
    s.add_argument(
        "--admin-token",
        nargs="?",
        const="",
        help="token of the lead's dashboard at /admin (default, or given alone: a random one, printed at start)",
    )
    s.set_defaults(func=cmd_label_serve)
    e = label_sub.add_parser(
        "export",
        parents=[common],
        help="write majority-vote pairs and the agreement report",
        description="Write the pairs whose ratings have a clear majority (ties and split votes dropped) for "
        "training, with their votes, margin (mean strength) and rationales, and print the agreement report "
        "(Krippendorff's alpha, each annotator's agreement with the majority, position bias), also written as JSON.",
    )
    e.add_argument("--db", required=True, help="labeling database written by 'label serve'")
    e.add_argument("--out", required=True, help="pairs file (or, with --format datasets, folder) to write")
    e.add_argument("--min-annotators", type=int, default=3, help="ratings an item needs to be voted on (default: 3)")
    e.add_argument("--report", help="agreement report to write (default: OUT with the suffix .agreement.json)")
    e.add_argument(
        "--min-strength",
        type=float,
        help="drop pairs whose mean strength towards chosen (the margin: 2 = much better, 1 = slightly, "
        "a tie 0, dissent negative) is below this; needs judgements made with --scale 5",
    )
    e.add_argument(
        "--format",
        choices=("jsonl", "csv", "parquet", "datasets"),
        default="jsonl",
        help="jsonl (default), csv (for spreadsheets), parquet, or datasets (a save_to_disk folder)",
    )
    e.add_argument(
        "--judge",
        metavar="MODEL",
        help="also judge every voted pair with an LLM judge (a model folder or the embedded alias; judge:MODEL too) "
        "and report its agreement with the majority vote beside the annotators'",
    )
    e.add_argument("--judge-prompt", metavar="FILE", help=JUDGE_HELP)
    e.set_defaults(func=cmd_label_export)
    label.set_defaults(func=lambda a: label.print_help() or 2)


# -- eval -----------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from preftune.api import evaluate
    from preftune.eval.evaluation import format_eval

    result = evaluate(
        args.model,
        ref=args.ref,
        baseline=args.baseline,
        pairs=args.pairs,
        prompts=args.prompts,
        reward=args.reward,
        judge_prompt=args.judge_prompt,
        num_samples=args.num_samples,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        max_prompts=args.max_prompts,
        seed=args.seed,
        beta=args.beta,
        batch_size=args.batch_size,
        confidence=args.confidence,
        bootstrap=args.bootstrap,
        output=args.output,
        chat_template_kwargs=_json_mapping("--chat-template-kwargs", args.chat_template_kwargs) if args.chat_template_kwargs else None,
        columns=_parse_columns(args.columns),
        by=args.by,
    )
    print(format_eval(result))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from preftune.eval.sweep import SweepSettings, curve_file, format_frontier, frontier_files, run_sweep, sweep_folder

    try:
        best_of = tuple(int(v) for v in args.best_of.split(",") if v.strip())
    except ValueError:
        raise PreftuneError(f"--best-of must be whole numbers separated by commas, got {args.best_of!r}") from None
    settings = SweepSettings(
        config=args.config,
        grid=args.set_grid,
        prompts=args.prompts,
        reward=args.reward,
        overrides=args.set or [],
        pairs=args.pairs,
        num_samples=args.num_samples,
        best_of=best_of or (1,),
        max_new_tokens=args.max_new_tokens,
        max_prompts=args.max_prompts,
        seed=args.seed,
        batch_size=args.batch_size,
        output_dir=args.output_dir,
        metric=args.metric,
    )
    rows = run_sweep(settings)
    print(format_frontier(rows))
    table, plot = frontier_files(sweep_folder(settings))
    log.info("curve -> %s", curve_file(sweep_folder(settings)))
    log.info("frontier -> %s", table)
    log.info("plot -> %s", plot)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from preftune.eval.report import build_report

    path = build_report(args.run_dir, args.output, args.max_samples)
    log.info("report -> %s", path)
    return 0


def add_eval_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """eval, sweep, report: measuring trained models (`preftune.eval`)."""
    ev = sub.add_parser(
        "eval",
        parents=[common],
        help="preference accuracy, reward, win rate, KL and length drift of a tuned model",
        description="Evaluate a tuned model against its reference. With --pairs: preference accuracy and implicit "
        "reward margins (beta * log-ratio) with bootstrap confidence intervals. With --prompts and --reward: samples "
        "from the model scored by the reward, win rate against the baseline's samples (the reference's unless "
        "--baseline), KL(model || reference) estimated from the model's samples at temperature 1 (log-ratio and "
        "per-token exact), and mean length against the baseline's. Prints a table and writes eval.json "
        "(and eval_samples.jsonl) into the run folder, or --output.",
    )
    ev.add_argument("--model", required=True, help="a training run folder, a LoRA adapter folder, or a model (then --ref is needed)")
    ev.add_argument("--ref", help="reference model (default: the run's reference, or the adapter's base)")
    ev.add_argument("--baseline", help="model whose samples the win rate, reward gain and length compare with: a run folder, an "
                    "adapter folder or a model (default: the reference)")
    ev.add_argument("--pairs", help="preference pairs (prompt/chosen/rejected) to score")
    ev.add_argument("--columns", metavar="FIELD=COLUMN,...", help="map the pairs file's field names to preftune's "
                    "(default: a run folder's own columns)")
    ev.add_argument("--chat-template-kwargs", metavar="JSON", help="extra chat-template variables "
                    "(default: a run folder's own chat_template_kwargs)")
    ev.add_argument("--prompts", help="held-out prompts to sample (JSONL/JSON/Parquet/CSV with 'prompt', or .txt)")
    ev.add_argument(
        "--reward",
        help="sentiment, length, a reward-model folder, module:function / file.py:function, or judge:MODEL (a pairwise "
        "LLM judge, judge:self the evaluated model: a judged win rate against the baseline's samples)",
    )
    ev.add_argument("--judge-prompt", metavar="FILE", help=JUDGE_HELP)
    ev.add_argument("--num-samples", type=int, default=4, help="samples per prompt (default: 4)")
    ev.add_argument("--max-prompts", type=int, help="use the first N prompts only")
    ev.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the reward samples (default: 1.0)")
    ev.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default: 1.0, off)")
    ev.add_argument("--max-new-tokens", type=int, default=48, help="tokens per sample at most (default: 48)")
    ev.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default: 0)")
    ev.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's, else 0.1)")
    ev.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: 16)")
    ev.add_argument("--confidence", type=float, default=0.95, help="level of the bootstrap intervals (default: 0.95)")
    ev.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    ev.add_argument("--by", metavar="FIELD", help="also give every measure per value of this record field (e.g. category), "
                    "with each group's gain over the baseline and the best-minus-worst difference")
    ev.add_argument("-o", "--output", help="eval.json to write (default: RUN/eval.json for a run folder, else ./eval.json)")
    ev.set_defaults(func=cmd_eval)
    sw = sub.add_parser(
        "sweep",
        parents=[common],
        help="one run per grid value (e.g. beta, max_train_samples), each evaluated: the reward-vs-KL frontier and a learning curve",
        description="Train one run per combination of the --set-grid values (in OUTPUT_DIR/KEY=VALUE), evaluate each "
        "on the same prompts and reward, and write frontier.csv and frontier.png (reward against KL) with the "
        "reference and best-of-N sampling from it as baselines, and curve.png: --metric against the first swept key, "
        "the base model as its first point for max_train_samples (0 pairs), max_steps or num_train_epochs. Resumable: "
        "finished runs and evaluations are kept.",
    )
    sw.add_argument("config", help="training config (.yaml, .yml or .json)")
    sw.add_argument("--set-grid", action="append", required=True, metavar="KEY=V1,V2,...", help="values to sweep (repeatable: every combination)")
    sw.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one config key for every run (repeatable)")
    sw.add_argument("--prompts", required=True, help="held-out prompts to sample")
    sw.add_argument("--reward", required=True, help="sentiment, length, a reward-model folder, or module:function")
    sw.add_argument("--pairs", help="held-out preference pairs: adds preference accuracy to each run's evaluation")
    sw.add_argument("--num-samples", type=int, default=4, help="samples per prompt of each run (default: 4)")
    sw.add_argument("--best-of", default="1,2,4,8,16", help="N of the best-of-N baseline (default: 1,2,4,8,16)")
    sw.add_argument("--max-prompts", type=int, help="use the first N prompts only")
    sw.add_argument("--max-new-tokens", type=int, default=48, help="tokens per sample at most (default: 48)")
    sw.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    sw.add_argument("--batch-size", type=int, default=16, help="sequences per forward (default: 16)")
    sw.add_argument("--output-dir", help="sweep folder (default: the config's output_dir)")
    sw.add_argument("--metric", default="reward", help="y of curve.png against the first swept key: reward (default), "
                    "preference_accuracy (needs --pairs), win_rate, kl, kl_monte_carlo or length")
    sw.set_defaults(func=cmd_sweep)
    rp = sub.add_parser(
        "report",
        parents=[common],
        help="one self-contained HTML page about a run: settings, curves, evaluation, frontier, samples",
        description="Write RUN_DIR/report.html: the run's settings, training curves, the evaluation of 'preftune eval' "
        "with intervals, the reward-vs-KL frontier when the run is part of a sweep, and samples of the baseline and "
        "the tuned model side by side. Plots are embedded; the page loads nothing from the network.",
    )
    rp.add_argument("run_dir", help="a training run folder (output_dir)")
    rp.add_argument("-o", "--output", help="HTML file to write (default: RUN_DIR/report.html)")
    rp.add_argument("--max-samples", type=int, default=8, help="prompts shown in the samples section (default: 8)")
    rp.set_defaults(func=cmd_report)


# -- recipes --------------------------------------------------------------------------------------


def cmd_quickstart(args: argparse.Namespace) -> int:
    import torch

    from preftune.eval.evaluation import format_table
    from preftune.recipes.quickstart import QuickstartSettings, run_quickstart

    settings = QuickstartSettings.for_device(
        torch.cuda.is_available(),
        output_dir=args.output_dir,
        model_name=args.model,
        max_steps=args.max_steps,
        eval_prompts=args.eval_prompts,
        eval_samples=args.eval_samples,
        seed=args.seed,
        overwrite=args.overwrite or None,
    )
    result = run_quickstart(settings)
    print(format_table(result, result["reward"]))
    log.info("done in %.0fs: %s", result["total_seconds"], os.path.join(settings.output_dir, "eval.json"))
    return 0


def cmd_iterate(args: argparse.Namespace) -> int:
    from preftune.recipes.iterate import format_iterate, load_iterate_config, run_iterate

    flags = {
        "rounds": args.rounds,
        "prompts": args.prompts,
        "eval_prompts": args.eval_prompts,
        "reward": args.reward,
        "judge_prompt": args.judge_prompt,
        "num_samples": args.num_samples,
        "min_margin": args.min_margin,
        "reference": args.reference,
    }
    cfg, it = load_iterate_config(args.config, args.set or [], flags)
    summary = run_iterate(cfg, it, overwrite=args.overwrite)
    print(format_iterate(summary))
    log.info("done in %.0fs: %s", summary["seconds"], os.path.join(cfg.output_dir, "summary.json"))
    return 0


def add_recipe_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """quickstart, iterate: end-to-end recipes (`preftune.recipes`)."""
    q = sub.add_parser(
        "quickstart",
        parents=[common],
        help="DPO on the bundled sentiment pairs, then a before/after table",
        description="Train DPO with LoRA on the bundled movie-review sentiment pairs from the embedded "
        "SmolLM2-135M-Instruct, sample the base and the tuned model on held-out prompts, and print mean "
        "reward, win rate, KL and length before and after; writes eval.json beside the training outputs.",
    )
    q.add_argument("--output-dir", default="runs/quickstart", help="where to write (default: runs/quickstart)")
    q.add_argument("--model", help="model to tune (default: smollm2-135m-instruct)")
    q.add_argument("--max-steps", type=int, help="optimizer steps (default: 24 on CPU, 150 on a GPU)")
    q.add_argument("--eval-prompts", type=int, help="held-out prompts to sample (default: 64 on CPU, all on a GPU)")
    q.add_argument("--eval-samples", type=int, help="samples per held-out prompt (default: 2 on CPU, 4 on a GPU)")
    q.add_argument("--seed", type=int, help="seed of training and sampling (default: 0)")
    q.add_argument("--overwrite", action="store_true", help="replace a run with other settings in the output folder")
    q.set_defaults(func=cmd_quickstart)
    it = sub.add_parser(
        "iterate",
        parents=[common],
        help="iterative DPO: sample, score, pair and train on the model's own samples, round after round",
        description="Each round samples the current policy on the prompts, scores the samples with the reward, "
        "pairs best against worst, trains DPO from the current policy (reference: the initial model or the "
        "previous round's) and evaluates it against the initial model on held-out prompts. CONFIG is a training "
        "config with an optional 'iterate:' block (see the README); the flags override that block. Writes "
        "round-N/ folders and summary.json, and prints the table. A rerun skips finished rounds and continues "
        "a half-done one; a larger --rounds extends a finished run.",
    )
    it.add_argument("config", help="training config (.yaml, .yml or .json) with an optional 'iterate:' block")
    it.add_argument("--rounds", type=int, help="rounds to run (default: 3)")
    it.add_argument("--prompts", help="training prompts: JSONL/JSON/Parquet/CSV with 'prompt', or .txt (default: the bundled sentiment prompts)")
    it.add_argument("--eval-prompts", help="held-out prompts for evaluation (default: the bundled held-out sentiment prompts)")
    it.add_argument(
        "--reward",
        help="sentiment (default), length, a reward-model folder, module:function / file.py:function, or judge:MODEL "
        "(AI feedback; judge:self: each round's policy judges its own samples)",
    )
    it.add_argument("--judge-prompt", metavar="FILE", help=JUDGE_HELP)
    it.add_argument("--num-samples", type=int, help="samples per prompt each round (default: 4)")
    it.add_argument("--min-margin", type=float, help="smallest score difference of a pair (default: 0)")
    it.add_argument("--reference", choices=("initial", "previous"), help="DPO reference of each round (default: previous)")
    it.add_argument("--set", action="append", metavar="KEY=VALUE", help="override one training config key (repeatable)")
    it.add_argument("--overwrite", action="store_true", help="replace an iterate run with other settings in output_dir")
    it.set_defaults(func=cmd_iterate)


# -- the parser -------------------------------------------------------------------------------

# Each group adds its commands' arguments beside the functions that run them.
COMMAND_GROUPS = (
    add_train_commands,
    add_data_commands,
    add_collect_commands,
    add_label_commands,
    add_eval_commands,
    add_recipe_commands,
)


class _StoreOnce(argparse._StoreAction):
    """An option that takes one value. Given twice, argparse keeps the last value without a word,
    so `--top-p 0.9 ... --top-p 0.95` would run with a setting the user may not have meant."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option_string: str | None = None) -> None:
        if option_string is not None:
            given = namespace.__dict__.setdefault("_given_once", {})
            shown = " ".join(map(str, values)) if isinstance(values, list) else str(values)
            if self.dest in given:
                raise PreftuneError(f"{option_string} given twice ({given[self.dest]} and {shown}): it takes one value")
            given[self.dest] = shown
        super().__call__(parser, namespace, values, option_string)


class _KeepLaidOutText(argparse.HelpFormatter):
    """Wraps one-paragraph descriptions as usual, but keeps text laid out in lines (an epilog
    with indented sections) as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class _Parser(argparse.ArgumentParser):
    """Every plain `store` option of the command line (its subcommands' too) takes one value."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks and debug logs")

    parser = _Parser(
        prog="preftune",
        description="Preference fine-tuning (DPO and its family) for causal language models.",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add_commands in COMMAND_GROUPS:
        add_commands(sub, common)
    return parser


def _out_of_memory_message(exc: BaseException) -> str:
    return (
        f"out of memory ({str(exc).splitlines()[0][:120]}): lower per_device_train_batch_size (and raise "
        "gradient_accumulation_steps to keep the global batch), lower max_seq_length, use LoRA (lora_r > 0), "
        "use_4bit on a GPU, gradient_checkpointing: true, or reference: precomputed"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except PreftuneError as exc:  # a repeated single-value option
        print(f"preftune: error: {exc}", file=sys.stderr)
        return 2
    vars(args).pop("_given_once", None)
    debug = bool(getattr(args, "debug", False))
    _setup_logging(debug)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PreftuneError as exc:
        if debug:
            raise
        for line in str(exc).splitlines() or [""]:  # several problems found at once: one line each
            print(f"preftune: error: {line}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # anything unforeseen still ends in one line unless --debug
        if debug:
            raise
        import torch

        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
            print(f"preftune: error: {_out_of_memory_message(exc)}", file=sys.stderr)
        else:
            first = str(exc).splitlines()[0] if str(exc) else ""
            print(f"preftune: error: {type(exc).__name__}: {first} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
