"""The package's three layers import one way: benchmarks -> command line -> library.

* the library (``amad``, ``amad.attention``, ``amad.capture``, ``amad.losses``, ``amad.options``,
  ``amad.distiller``, ``amad.trainer`` and the other top-level modules) imports neither ``amad.cli``
  nor ``amad.bench``, and of third-party packages only :data:`LIBRARY_PACKAGES`;
* the command line (``amad.cli``) never imports ``amad.bench`` (it reaches the benchmarks through
  the ``amad.commands`` entry point);
* ``import amad`` and the library's modules load none of the command line's or benchmarks' packages.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "amad"
LIBRARY_PACKAGES = {"torch", "transformers", "accelerate", "safetensors", "triton"}
#: Packages one library module may import inside the function that needs them, only when the user runs that way.
OPTIONAL_PACKAGES = {"amad.zero": {"deepspeed"}}  # the Teacher's ZeRO-3 engine, under a DeepSpeed Trainer only
#: What the library never loads. (``transformers`` itself imports PIL, and its ``Trainer`` imports ``datasets``
#: when they are installed, so those are checked on the modules that do not import the Trainer.)
NEVER_LOADED = ("matplotlib", "sacrebleu", "pycocoevalcap", "tensorboard", "amad.cli", "amad.bench")
NOT_LOADED_WITHOUT_TRAINER = NEVER_LOADED + ("datasets",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "amad.cli" or module.startswith("amad.cli."):
        return "cli"
    if module == "amad.bench" or module.startswith("amad.bench."):
        return "bench"
    return "library"


def imports_of(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (top level or inside functions)."""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # `from . import cli` imports a module
    return found


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_go_one_way(path: Path) -> None:
    here = layer(module_name(path))
    allowed = {"library": {"library"}, "cli": {"library", "cli"}, "bench": {"library", "cli", "bench"}}[here]
    for name in imports_of(path):
        if name == "amad" or name.startswith("amad."):
            assert layer(name) in allowed, f"{module_name(path)} ({here}) imports {name} ({layer(name)})"


@pytest.mark.parametrize("path", [p for p in MODULES if layer(module_name(p)) == "library"],
                         ids=lambda p: module_name(p))
def test_library_needs_only_its_declared_packages(path: Path) -> None:
    third_party = {
        name.split(".")[0] for name in imports_of(path)
        if name and not name.startswith("amad") and name.split(".")[0] not in sys.stdlib_module_names
    }
    allowed = LIBRARY_PACKAGES | OPTIONAL_PACKAGES.get(module_name(path), set())
    assert third_party <= allowed, f"{module_name(path)} imports {sorted(third_party - allowed)}"


@pytest.mark.parametrize("modules, unwanted", [
    ("amad", NOT_LOADED_WITHOUT_TRAINER + ("torch", "yaml")),
    ("amad.losses, amad.capture, amad.distiller, amad.options", NOT_LOADED_WITHOUT_TRAINER),
    ("amad.trainer", NEVER_LOADED + ("deepspeed",)),
])
def test_importing_the_library_loads_no_other_layer(modules: str, unwanted: tuple) -> None:
    code = f"import sys, {modules}\nprint(sorted(m for m in {unwanted!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_config_error_loads_no_torch(tmp_path: Path) -> None:
    """Structural config errors come before any heavy import, so they answer at once."""
    bad = tmp_path / "config.yaml"
    bad.write_text("task: sequence-classification\nteacher: {path: nowhere}\n")
    code = (
        "import sys\nfrom amad.cli import main\n"
        f"code = main(['distill', {str(bad)!r}, '--out', {str(tmp_path / 'run')!r}])\n"
        "print(code, 'torch' in sys.modules, 'transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.stdout.split()[-3:] == ["2", "False", "False"], done.stdout + done.stderr
    assert "missing required key 'student'" in done.stderr
