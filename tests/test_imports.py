"""The import rule: config <- computation <- objectives <- training <- api/cli/apps.

A module imports the project's modules of its own layer or a lower one, never a higher one (lazy
imports inside functions included), so the config stays a leaf that loads no torch, the
computation never reaches into a run's machinery, and the run machinery never into an app."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import preftune

PACKAGE = Path(preftune.__file__).parent
LAYERS = ["leaf", "computation", "objectives", "training", "apps"]


def layer(module: str) -> str:
    """The layer of a dotted module name inside the package."""
    parts = module.split(".")[1:]
    if parts[:1] in (["config"], ["errors"]):
        return "leaf"
    if parts[:1] in (["objectives"], ["training"]):
        return parts[0]
    if not parts or parts[0] in ("api", "cli", "__main__", "collect", "eval", "label", "recipes"):
        return "apps"
    return "computation"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of the project in a file, lazy ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("preftune")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("preftune"):
            if node.module == "preftune":  # `from preftune import chat`: each name is a module (or the version)
                found += [(node.lineno, f"preftune.{a.name}") for a in node.names if a.name != "__version__"]
            else:
                found.append((node.lineno, node.module))
    return found


def test_no_module_imports_a_higher_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        if name == "preftune":  # the package's own lazy names
            continue
        mine = LAYERS.index(layer(name))
        for line, target in imports(path):
            if LAYERS.index(layer(target)) > mine:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name} ({layer(name)}) imports {target} ({layer(target)})")
    assert wrong == []


def test_config_imports_nothing_of_the_project_but_errors():
    targets = {target for _, target in imports(PACKAGE / "config.py")}
    assert targets == {"preftune.errors"}


def test_reading_a_config_loads_no_torch(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("strategy: dpo\nbeta: 0.2\nlora_r: 8\nfsdp: full_shard\ncolumns: {prompt: question}\n")
    code = (
        "import sys; from preftune.config import load_config, resolve; "
        f"s = resolve(load_config({str(path)!r})); "
        "print(s.loss.beta, s.lora.lora_r, s.sharding.mode, s.data.layout.describe(), "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'numpy')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0.2 8 full_shard columns: {prompt: question} []"


def test_the_layers_are_known():
    assert layer("preftune.config") == "leaf" and layer("preftune.losses") == "computation"
    assert layer("preftune.objectives.dpo") == "objectives" and layer("preftune.training.recipe") == "training"
    assert layer("preftune.eval.evaluation") == "apps" and layer("preftune.api") == "apps"
