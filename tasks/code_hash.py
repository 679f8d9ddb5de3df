"""Which source files compute a pipeline stage, and one hash over them (part of the stage cache key).

A stage's code is the import closure of its entry modules inside this repository's packages: every
``import`` counts wherever it stands (heavy engines are imported inside functions), and so do
modules started as ``[python, "-m", "tasks.quantize.probe"]`` or ``importlib.import_module("...")``.
Hashing the files themselves, not a hand-kept recipe number, means nobody has to remember to bump
anything: editing any file a stage runs invalidates that stage, and through the chained keys every
stage downstream of it.

``configs`` is left out on purpose: the config *values* each stage reads are part of its key
already, so a docstring edit in the schema does not throw away hours of training.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "flows", "serving")
# The modules that run each cached stage of `lmforge run` (their imports bring in the rest).
STAGE_ENTRY_MODULES: dict[str, tuple[str, ...]] = {
    "finetune": ("flows.finetune",),
    "align": ("flows.align",),
    "quantize": ("flows.quantize",),
    "evaluate": ("tasks.holdout",),
    "register": ("tasks.registry",),
}


def stage_sources(stage: str, root: Path = REPO_ROOT) -> list[Path]:
    """The source files (relative to ``root``) that compute ``stage``, sorted."""
    if stage not in STAGE_ENTRY_MODULES:
        raise KeyError(f"unknown stage {stage!r}; stages: {', '.join(STAGE_ENTRY_MODULES)}")
    root = Path(root)
    seen: set[str] = set()
    pending = list(STAGE_ENTRY_MODULES[stage])
    files: set[Path] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        file = _module_file(root, module)
        if file is None:
            continue
        files.add(file.relative_to(root))
        pending.extend(_imported_modules(file, module, root))
    return sorted(files)


def stage_code_hash(stage: str, root: Path = REPO_ROOT) -> str:
    """Short sha256 over the paths and contents of :func:`stage_sources`."""
    digest = hashlib.sha256()
    for relative in stage_sources(stage, root):
        digest.update(relative.as_posix().encode() + b"\0")
        digest.update((Path(root) / relative).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _module_file(root: Path, module: str) -> Path | None:
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported_modules(file: Path, module: str, root: Path) -> list[str]:
    """Project modules ``file`` imports anywhere (also inside functions), with their parent packages."""
    tree = ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    package = module if file.name == "__init__.py" else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.append(base)
            # `from tasks.quantize import export` imports the submodule export.
            found.extend(f"{base}.{alias.name}" for alias in node.names if _module_file(root, f"{base}.{alias.name}"))
        elif isinstance(node, (ast.List, ast.Tuple)):
            found.extend(_run_as_module(node.elts))
        elif isinstance(node, ast.Call) and _name(node.func) == "import_module" and node.args:
            found.extend(_strings(node.args[:1]))
    found = [name for name in found if name.split(".")[0] in PACKAGES]
    with_parents: list[str] = []
    for name in found:
        parts = name.split(".")
        with_parents.extend(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return with_parents


def _run_as_module(elements: list[ast.expr]) -> list[str]:
    """Module names that follow a ``"-m"`` in a command list."""
    return [name for flag, arg in zip(elements, elements[1:])
            if isinstance(flag, ast.Constant) and flag.value == "-m" for name in _strings([arg])]


def _strings(nodes: list[ast.expr]) -> list[str]:
    return [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""
