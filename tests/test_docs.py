"""The README stays true: every config key is documented, and CI installs and tests as it says."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from preftune.config import TrainConfig
from preftune.recipes.iterate import IterateConfig

ROOT = Path(__file__).resolve().parent.parent


def readme() -> str:
    return (ROOT / "README.md").read_text()


def test_every_config_key_is_in_the_reference_table():
    table = readme().split("## Config reference", 1)[1].split("## Coming from TRL", 1)[0]
    documented = set(re.findall(r"`([a-z_0-9]+)`", table))
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in documented]
    assert not missing, f"undocumented config keys: {missing}"


def test_every_iterate_key_is_in_its_table():
    section = readme().split("## Iterative DPO", 1)[1].split("\n## ", 1)[0]
    table = section.split("| `iterate:` key |", 1)[1].split("\n\n", 1)[0]
    documented = set(re.findall(r"`([a-z_0-9]+)`", table))
    missing = [f.name for f in dataclasses.fields(IterateConfig) if f.name not in documented]
    assert not missing, f"undocumented iterate keys: {missing}"


def test_ci_runs_the_readme_install_and_test_commands():
    text = readme()
    ci = (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    install = text.split("## Install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert install.split("#", 1)[0].strip() == "make quickstart"
    # The by-hand install is what the Makefile runs (the venv line differs only in how).
    by_hand = text.split("CPU machine (laptop, CI):", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    for line in by_hand.strip().splitlines()[1:]:
        command = line.split("#", 1)[0].strip()
        assert command.replace("pip install", "$(BIN)/pip install", 1) in makefile, command
    test_command = text.split("## Tests", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert test_command == "make test"
    assert "\nmake test\n" in ci
    assert "PREFTUNE_REQUIRE_BROWSER=1 $(BIN)/python -m pytest" in makefile


def test_every_command_is_in_the_readme():
    import argparse

    from preftune.cli import build_parser

    text = readme()
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [name for name in sub.choices if f"preftune {name}" not in text]
    assert not missing, f"commands the README never shows: {missing}"


def test_the_readme_shows_how_to_load_the_embedded_model_from_python(tiny_model_dir):
    """The snippet runs as written, with the alias swapped for a local folder (the real GGUF is
    converted only in PREFTUNE_SLOW_TESTS runs)."""
    import os

    section = readme().split("### The embedded model from Python", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert 'resolve_model_path("smollm2-135m-instruct")' in code
    assert "Q4_1 GGUF" in section and "not identical with them" in section
    name = "smollm2-135m-instruct" if os.environ.get("PREFTUNE_SLOW_TESTS") else str(tiny_model_dir)
    scope: dict = {}
    exec(code.replace('"smollm2-135m-instruct"', repr(name)), scope)
    assert scope["model"].config.vocab_size == len(scope["tokenizer"])
