"""The package's layers point down only: a module imports modules of its own layer or below
(from layer 3 up: below, or inside its own package), and erasure methods and attacks never
import each other. See docs/architecture.md for the layer table."""

from __future__ import annotations

import ast
from pathlib import Path

import erasekit

PACKAGE = Path(erasekit.__file__).parent

# Lowest first. A module belongs to the first entry its dotted name starts with.
LAYERS: list[tuple[str, ...]] = [
    (
        "errors",
        "registry",
        "stats",
        "outputs",
        "provenance",
        "distributed",
        "tokenizer",
        "lora",
        "config",
        "ldm",
        "signals",
        "progress",
    ),  # fmt: skip
    ("models", "concepts", "guidance", "world.render", "world.info", "world", "arguments"),
    (
        "sampling",
        "data",
        "training",
        "inversion",
        "prefix",
        "evaluation",
        "detectors",
        "world.build",
        "world.classifier",
        "testing",
    ),  # fmt: skip
    ("methods", "attacks", "reporting"),
    ("auditing", "results"),
    ("api", "catalog"),
    ("bench",),
    ("commands", ""),  # "": the package facade (``import erasekit``), which re-exports the API
    ("cli",),
    ("__main__",),
]
SAME_LAYER_FREE = 2  # up to this layer, modules of one layer may import each other


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def layer_of(name: str) -> tuple[int, str]:
    for i, entries in enumerate(LAYERS):
        for entry in entries:
            if name == entry or (entry and name.startswith(entry + ".")):
                return i, entry
    raise AssertionError(f"erasekit.{name} is in no layer: add it to LAYERS")


def imports_of(path: Path) -> set[str]:
    """erasekit modules imported anywhere in the file (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "erasekit"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] == "erasekit":
                found.add(node.module)
    return {f[len("erasekit.") :] if f != "erasekit" else "" for f in found}


def violation(src: str, target: str) -> str | None:
    src_layer, src_group = layer_of(src)
    dst_layer, dst_group = layer_of(target)
    same_package = src_group == dst_group and src_group != ""
    ok = dst_layer < src_layer or same_package
    ok = ok or (dst_layer == src_layer and src_layer <= SAME_LAYER_FREE)
    if ok:
        return None
    return f"erasekit.{src} (layer {src_layer}) imports erasekit.{target} (layer {dst_layer})"


def violations() -> list[str]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = module_name(path)
        if src == "":  # the package facade re-exports the API
            continue
        found += [v for t in sorted(imports_of(path)) if (v := violation(src, t))]
    return found


def test_no_module_imports_a_layer_above_it():
    assert violations() == []


def test_the_check_catches_upward_and_sibling_imports():
    assert violation("methods.negative_embedding", "attacks.concept_inversion")
    assert violation("attacks.finetune", "methods")
    assert violation("auditing", "commands._options")
    assert violation("training", "api")
    assert violation("commands.demo", "commands.audit") is None  # one package
    assert violation("attacks.finetune", "training") is None


def test_scripts_import_only_what_exists():
    """Every ``from erasekit... import name`` in scripts/ names something that exists (the
    evidence and benchmark scripts are not imported by the tests, so a moved name would rot)."""
    import ast
    import importlib

    missing = []
    for script in sorted((PACKAGE.parent / "scripts").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if not (
                isinstance(node, ast.ImportFrom) and (node.module or "").startswith("erasekit")
            ):
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except ImportError:
                        missing.append(f"{script.name}: {node.module}.{alias.name}")
    assert not missing, missing


def test_code_is_linted_and_formatted():
    """`make lint` as part of the suite: ruff's lint rules and formatter over the project."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    root = PACKAGE.parent
    targets = ["erasekit", "tests", "scripts"]
    lint = subprocess.run([ruff, "check", *targets], cwd=root, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout[-3000:]
    fmt = subprocess.run([ruff, "format", "--check", *targets], cwd=root, capture_output=True,
                         text=True)  # fmt: skip
    assert fmt.returncode == 0, fmt.stdout[-3000:]
