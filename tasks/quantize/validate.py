"""Adapter checks that run before any export work: is it a readable LoRA adapter for *this* base?

Everything here reads only JSON and safetensors headers/tensors of the adapter (small) and the
*header* of the base weights, so a wrong input fails in well under a second instead of after a
minute of export.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from tasks.files import sha256_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """An adapter that cannot be used with the given base model; the message names file and reason."""


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What the checks learned about a valid adapter."""

    path: Path
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    modules: list[str]  # module paths in the base that carry LoRA, e.g. model.layers.0.self_attn.q_proj
    base_model_name_or_path: str | None
    name_matches_base: bool
    extra_tensors: list[str]  # non-LoRA tensors (modules_to_save, ...): merge handles them, runtime LoRA cannot
    sha256: str

    def scaling(self, module: str, config: dict[str, Any]) -> float:
        """PEFT's LoRA scale for one module (alpha / r, or alpha / sqrt(r) with rsLoRA), honouring patterns."""
        rank = _pattern_value(config.get("rank_pattern") or {}, module, self.rank)
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, self.lora_alpha)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def validate_adapter(adapter_dir: Path, base_dir: Path, allow_name_mismatch: bool = False) -> AdapterInfo:
    """Check that ``adapter_dir`` is a loadable PEFT LoRA adapter whose shapes fit ``base_dir``.

    Checks, in order: the directory exists; ``adapter_config.json`` parses and describes LoRA;
    ``adapter_model.safetensors`` exists and every tensor loads and is finite; each LoRA module
    exists in the base with matching in/out features and rank; ``base_model_name_or_path`` names
    this base (unless ``allow_name_mismatch``).

    Raises:
        AdapterError: the first problem found, naming the file and what to do.
    """
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter directory not found: {adapter_dir}")
    config = read_adapter_config(adapter_dir)
    tensors = _load_adapter_tensors(adapter_dir / ADAPTER_WEIGHTS)
    rank = config["r"]
    base_shapes = base_weight_shapes(base_dir)
    modules, extras = _check_shapes(tensors, base_shapes, config, adapter_dir, base_dir)
    declared = config.get("base_model_name_or_path")
    name_ok = base_name_matches(declared, base_dir)
    if not name_ok and not allow_name_mismatch:
        raise AdapterError(
            f"{adapter_dir / ADAPTER_CONFIG}: base_model_name_or_path is {declared!r}, but the base model is "
            f"{base_dir} ({', '.join(sorted(_base_names(base_dir)))}). The adapter was trained for another base; "
            "pass the matching base, or set quantize.allow_base_name_mismatch=true if this base is a renamed copy"
        )
    return AdapterInfo(
        path=adapter_dir,
        rank=rank,
        lora_alpha=float(config["lora_alpha"]),
        use_rslora=bool(config.get("use_rslora")),
        target_modules=_as_list(config.get("target_modules")),
        modules=sorted(modules),
        base_model_name_or_path=declared,
        name_matches_base=name_ok,
        extra_tensors=sorted(extras),
        sha256=sha256_dir(adapter_dir, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]),
    )


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """Parse and sanity-check ``adapter_config.json``; raises AdapterError naming the problem."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(
            f"{path} is missing: not a PEFT adapter directory (expected {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise AdapterError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path}: peft_type is {config.get('peft_type')!r}; only LoRA adapters ('LORA') are supported"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"{path}: {key} must be a positive number, got {value!r}")
    if config.get("use_dora"):
        raise AdapterError(f"{path}: DoRA adapters are not supported by the OpenVINO runtime-LoRA path")
    return config


def base_weight_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of a HF model directory, read from safetensors headers only."""
    from safetensors import safe_open

    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise AdapterError(f"base model directory {base_dir} has no config.json")
    files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise AdapterError(f"base model directory {base_dir} has no *.safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def base_name_matches(declared: str | None, base_dir: Path) -> bool:
    """Does the adapter's ``base_model_name_or_path`` name this base (path, store name, or source)?"""
    if not declared:
        return True  # nothing declared: shapes are the only evidence, and they were checked
    declared_path = Path(declared).expanduser()
    if declared_path.is_dir():
        try:
            if declared_path.resolve() == Path(base_dir).resolve():
                return True
        except OSError:
            pass
    candidates = {declared, declared.rstrip("/").split("/")[-1], declared.replace("/", "--")}
    return bool(candidates & _base_names(base_dir))


def _base_names(base_dir: Path) -> set[str]:
    base_dir = Path(base_dir)
    names = {base_dir.name, str(base_dir), str(base_dir.resolve())}
    try:
        manifest = json.loads((base_dir / "manifest.json").read_text())
        names |= {str(manifest.get("name", "")), str(manifest.get("source", ""))}
        names.add(str(manifest.get("source", "")).rstrip("/").split("/")[-1])
    except (OSError, ValueError):
        pass
    try:
        name_or_path = json.loads((base_dir / "config.json").read_text()).get("_name_or_path") or ""
        names |= {name_or_path, name_or_path.rstrip("/").split("/")[-1]}
    except (OSError, ValueError):
        pass
    return {n for n in names if n}


def _load_adapter_tensors(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        legacy = path.with_name("adapter_model.bin")
        hint = f" ({legacy.name} found: re-save the adapter with safe_serialization=True)" if legacy.is_file() else ""
        raise AdapterError(f"{path} is missing{hint}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise AdapterError(f"{path}: cannot load adapter weights, the file is corrupt or truncated ({err})") from None
    if not tensors:
        raise AdapterError(f"{path}: holds no tensors")
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
            raise AdapterError(f"{path}: tensor {key} contains NaN or Inf values")
    return tensors


def _check_shapes(tensors: dict, base_shapes: dict, config: dict, adapter_dir: Path, base_dir: Path):
    """Pair lora_A/lora_B per module and compare with the base weight; returns (modules, extra tensors)."""
    where = adapter_dir / ADAPTER_WEIGHTS
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    extras = []
    for key, tensor in tensors.items():
        name = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            marker = f".{part}"
            if marker in name:
                module = name.split(marker)[0]
                pairs.setdefault(module, {})[part.replace("embedding_", "")] = tuple(tensor.shape)
                pairs[module]["embedding"] = ("embedding" in part,)
                break
        else:
            extras.append((name, tuple(tensor.shape)))
    if not pairs:
        raise AdapterError(f"{where}: no lora_A/lora_B tensors found")
    for module, parts in sorted(pairs.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            raise AdapterError(f"{where}: module {module} has only {sorted(k for k in parts if k != 'embedding')}")
        base_key = f"{module}.weight"
        if base_key not in base_shapes:
            raise AdapterError(
                f"{where}: LoRA module {module} does not exist in the base model {base_dir}; "
                "the adapter belongs to a different architecture"
            )
        rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        a, b, weight = parts["lora_A"], parts["lora_B"], base_shapes[base_key]
        if parts["embedding"][0]:  # embedding LoRA: A is (r, vocab), B is (hidden, r); base weight is (vocab, hidden)
            expected_a, expected_b = (rank, weight[0]), (weight[1], rank)
        else:  # linear: base weight is (out, in); A is (r, in), B is (out, r)
            expected_a, expected_b = (rank, weight[1]), (weight[0], rank)
        if a != expected_a or b != expected_b:
            raise AdapterError(
                f"{where}: shape mismatch at {module}: adapter A{list(a)} B{list(b)} but the base weight is "
                f"{list(weight)} (expected A{list(expected_a)} B{list(expected_b)} for r={rank}); "
                "the adapter was trained on a different base model"
            )
    for name, shape in extras:
        base_key = name.replace(".modules_to_save.default", "").replace(".original_module", "")
        if base_key in base_shapes and tuple(base_shapes[base_key]) != shape:
            raise AdapterError(
                f"{where}: {name} has shape {list(shape)}, base {base_key} has {list(base_shapes[base_key])}"
            )
    return list(pairs), [name for name, _ in extras]


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches rank/alpha patterns as key suffixes of the module path.
    for pattern, value in patterns.items():
        if module == pattern or module.endswith(f".{pattern}"):
            return value
    return default


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else sorted(str(v) for v in value)
