"""Tokenizers that render the chat templates of the major model families as the real models do.

Each template in `fixtures/chat_templates/` is the one the family's public tokenizer config ships;
`families.json` gives its BOS/EOS/pad, whether the tokenizer adds BOS to plain text, its turn end and
the special tokens. The tokenizer under it is the tests' tiny byte-level BPE with those tokens added,
so a template renders and tokenizes exactly as for the real model, only with a small vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

from conftest import build_tiny_tokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
FAMILIES: dict[str, dict] = json.loads((FIXTURES / "families.json").read_text())


def family_tokenizer(name: str):
    """The tiny tokenizer dressed as family `name` (a template file name)."""
    from tokenizers import processors

    facts = FAMILIES[name]
    tok = build_tiny_tokenizer()
    specials = [t for t in facts["special"] if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": specials})
    plain = [t for t in facts.get("added_not_special", []) if t not in tok.get_vocab()]
    if plain:
        tok.add_tokens(plain)
    tok.bos_token = facts["bos"] if facts["bos"] else None
    tok.eos_token = facts["eos"]
    tok.pad_token = facts["pad"] if facts["pad"] else facts["eos"]
    if facts["tokenizer_adds_bos"]:
        bos = facts["bos"]
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))]
        )
    else:
        tok.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.chat_template = (FIXTURES / name).read_text()
    return tok
