"""Chat tokens exactly as at inference, for the templates of seven model families.

The context must be the template's own rendering with the generation prompt (what generation sees),
and the completion exactly the assistant turn up to and including the family's turn end, nothing
after it (Gemma's `\\n<eos>`, Phi-3's `\\n<|endoftext|>` and ChatML's `\\n` are not generated). The
expected completion texts are written out by hand per family.
"""

from __future__ import annotations

import pytest

from chat_families import FAMILIES, family_tokenizer
from preftune import chat
from preftune.batching import encode_completion, encode_prompt
from preftune.errors import PreftuneError

ANSWER = "Paris is the capital."
# What each family's model emits for ANSWER, up to and including the token generation stops on.
COMPLETIONS = {
    "llama-3.1-instruct.jinja": "Paris is the capital.<|eot_id|>",
    "qwen2.5-instruct.jinja": "Paris is the capital.<|im_end|>",
    "qwen3.jinja": "<think>\n\n</think>\n\nParis is the capital.<|im_end|>",
    "gemma-2-it.jinja": "Paris is the capital.<end_of_turn>",
    "gemma-3-it.jinja": "Paris is the capital.<end_of_turn>",
    "mistral-7b-instruct-v0.3.jinja": " Paris is the capital.</s>",
    "phi-3-mini-instruct.jinja": "Paris is the capital.<|end|>",
}
SYSTEM = {"role": "system", "content": "Answer in one sentence."}
USER = {"role": "user", "content": "What is the capital of France?"}
PROMPTS = {
    "single": [USER],
    "system": [SYSTEM, USER],
    "multi": [USER, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Say it as a sentence."}],
    "system-multi": [SYSTEM, USER, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Say it as a sentence."}],
}
REPLY = [{"role": "assistant", "content": ANSWER}]


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _cases():
    for family in FAMILIES:
        for kind in PROMPTS:
            if family == "gemma-2-it.jinja" and kind.startswith("system"):
                continue  # refuses system messages: its own test
            yield family, kind


@pytest.mark.parametrize(("family", "kind"), list(_cases()))
def test_context_and_completion_are_the_inference_tokens(family, kind):
    tok = family_tokenizer(family)
    prompt = PROMPTS[kind]
    context = encode_prompt(tok, prompt)
    completion = encode_completion(tok, prompt, REPLY)

    # The context is the template's own rendering with the generation prompt.
    assert context == _ids(tok, tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
    # The completion is what the model emits, ending on the turn end: nothing after it.
    assert completion == _ids(tok, COMPLETIONS[family])
    assert completion[-1] == tok.convert_tokens_to_ids(FAMILIES[family]["turn_end"])
    # One BOS at most, and never in the completion.
    if tok.bos_token_id is not None:
        assert (context + completion).count(tok.bos_token_id) <= 1
        assert tok.bos_token_id not in completion


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_turn_end_is_found_from_the_template(family):
    assert chat.turn_end(family_tokenizer(family)) == FAMILIES[family]["turn_end"]


def test_plain_text_gets_one_bos_and_the_eos():
    tok = family_tokenizer("gemma-3-it.jinja")
    context = encode_prompt(tok, "The capital of France is")
    completion = encode_completion(tok, "The capital of France is", " Paris.")
    assert context == [tok.bos_token_id] + _ids(tok, "The capital of France is")
    assert completion == _ids(tok, " Paris.") + [tok.eos_token_id]


def test_mistral_system_prompt_is_scored_as_generation_sees_it():
    """Mistral v0.3 puts the system text on the last user turn only while no answer follows, so
    the prompt is not a prefix of prompt + answer: the context keeps the system text, and the
    completion is the template's own assistant turn (its leading space included)."""
    tok = family_tokenizer("mistral-7b-instruct-v0.3.jinja")
    context = tok.decode(encode_prompt(tok, PROMPTS["system"]))
    completion = tok.decode(encode_completion(tok, PROMPTS["system"], REPLY))
    assert context == "<s>[INST] Answer in one sentence.\n\nWhat is the capital of France?[/INST]"
    assert completion == " Paris is the capital.</s>"
    full = tok.apply_chat_template(PROMPTS["system"] + REPLY, tokenize=False)
    assert not full.startswith(context)  # the case the fallback exists for


def test_gemma2_refuses_a_system_message_in_one_line_and_folds_on_request():
    from preftune.batching import tokenize_dataset
    from preftune.data import validate_record

    tok = family_tokenizer("gemma-2-it.jinja")
    example = validate_record("pairs.jsonl:3", {"prompt": PROMPTS["system"], "chosen": ANSWER, "rejected": "No idea."})
    with pytest.raises(PreftuneError) as info:
        tokenize_dataset(tok, [example], 256, None)
    assert str(info.value) == (
        "pairs.jsonl:3: the chat template refuses a system message (System role not supported): remove it, or set "
        "fold_system_message: true to put it at the start of the first user turn, as Gemma 3's template does"
    )
    chat.configure(tok, fold_system=True)
    pairs, _ = tokenize_dataset(tok, [example], 256, None)
    assert tok.decode(pairs[0].prompt_ids) == (
        "<bos><start_of_turn>user\nAnswer in one sentence.\n\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert tok.decode(pairs[0].chosen_ids) == "Paris is the capital.<end_of_turn>"


def test_chat_template_kwargs_reach_the_rendering():
    tok = chat.configure(family_tokenizer("qwen3.jinja"), {"enable_thinking": False})
    context = tok.decode(encode_prompt(tok, [USER]))
    assert context.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(encode_completion(tok, [USER], REPLY)) == "Paris is the capital.<|im_end|>"


def test_a_records_tools_reach_the_template():
    tok = family_tokenizer("qwen2.5-instruct.jinja")
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    context = encode_prompt(tok, [USER], tools)
    assert context == _ids(tok, tok.apply_chat_template([USER], tools=tools, add_generation_prompt=True, tokenize=False))
    assert "get_weather" in tok.decode(context)
    assert encode_completion(tok, [USER], REPLY, tools) == _ids(tok, "Paris is the capital.<|im_end|>")


def test_sft_conversations_end_each_turn_at_its_turn_end():
    from preftune.sequences import encode_conversation

    tok = family_tokenizer("gemma-3-it.jinja")
    messages = PROMPTS["multi"] + REPLY
    ids, mask = encode_conversation(tok, messages)
    trained = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(trained) == "Paris.<end_of_turn>Paris is the capital.<end_of_turn>"
    # the whole sequence is the template's rendering without what follows the last turn end
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ids) == full[: full.rindex("<end_of_turn>") + len("<end_of_turn>")]


def _family_model_dir(tmp_path, family: str):
    from conftest import build_tiny_model

    tok = family_tokenizer(family)
    folder = tmp_path / family.split(".jinja")[0]
    build_tiny_model(len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, tok


def _plain_logps(model, tok, context_text: str, completion_text: str) -> float:
    import torch

    context = _ids(tok, context_text)
    ids = torch.tensor([context + _ids(tok, completion_text)])
    with torch.no_grad():
        logits = model(ids).logits.log_softmax(-1)[0]
    return sum(logits[t - 1, ids[0, t]].item() for t in range(len(context), ids.shape[1]))


@pytest.mark.parametrize(
    ("family", "kwargs", "completion"),
    [
        ("gemma-3-it.jinja", None, "{}<end_of_turn>"),
        ("qwen3.jinja", None, "<think>\n\n</think>\n\n{}<|im_end|>"),
        ("qwen3.jinja", {"enable_thinking": False}, "{}<|im_end|>"),
        ("phi-3-mini-instruct.jinja", None, "{}<|end|>"),
    ],
    ids=["gemma3", "qwen3", "qwen3-no-thinking", "phi3"],
)
def test_a_training_step_scores_the_inference_tokens(tmp_path, family, kwargs, completion):
    """One DPO step on the family's template: logps/* equal the model's own forward on the
    template's rendering (with the same template arguments) and the hand-written completion."""
    import json

    import preftune
    from transformers import AutoModelForCausalLM

    folder, tok = _family_model_dir(tmp_path, family)
    rows = [
        {"prompt": [SYSTEM, USER], "chosen": ANSWER, "rejected": "Lyon, I think."},
        {"prompt": PROMPTS["multi"], "chosen": "Paris is the capital of France.", "rejected": "No."},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model_name": str(folder), "dataset": str(data), "output_dir": str(tmp_path / "run"), "lora_r": 0,
              "max_steps": 1, "per_device_train_batch_size": 2, "eval_split": 0, "logging_steps": 1,
              "progress_bar": False, "max_seq_length": 512, "cache_dir": str(tmp_path / "cache")}
    if kwargs:
        config["chat_template_kwargs"] = kwargs
    first = preftune.train(config).history()[0]

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    for key, side in (("logps/chosen", "chosen"), ("logps/rejected", "rejected")):
        expected = [
            _plain_logps(model, tok, tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False, **(kwargs or {})),
                         completion.format(r[side]))
            for r in rows
        ]
        assert first[key] == pytest.approx(sum(expected) / 2, rel=1e-4)

    if kwargs:
        from preftune.collect.generation import load_generation_model
        from preftune.eval.evaluation import resolve_target

        target = resolve_target(str(tmp_path / "run"))
        assert target.chat_template_kwargs == kwargs
        _, loaded = load_generation_model(target.model, template_kwargs=target.chat_template_kwargs)
        assert loaded.decode(encode_prompt(loaded, [USER])).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
