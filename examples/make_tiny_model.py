"""Write a tiny random-weight Llama and a tokenizer trained on the bundled sentiment text to a folder
(default `runs/tiny-sentiment-model`), for trying sweeps and learning curves in a minute on a CPU.

The model knows nothing at the start; what it learns from the pairs is all the curve shows. For
real numbers use the embedded SmolLM2-135M-Instruct (the examples' default).

    python examples/make_tiny_model.py [FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def main(folder: str = "runs/tiny-sentiment-model") -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    data = Path(__file__).resolve().parent.parent / "src" / "preftune" / "resources" / "sentiment" / "train.jsonl"
    texts = []
    for line in data.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        texts += [m["content"] for m in record["prompt"]] + [record["chosen"], record["rejected"]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=specials,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"wrote {folder} ({sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)})")


if __name__ == "__main__":
    main(*sys.argv[1:])
