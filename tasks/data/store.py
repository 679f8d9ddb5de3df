"""Where curated data lives, how its version is computed, and how it is read back.

Layout under ``<home>/data/``::

    LATEST                      newest version string
    <version>/dataset/          datasets.DatasetDict (train, validation, test)
    <version>/<split>.jsonl     the same records, one JSON object per line
    <version>/card.md|json      the data card; lengths.png its histogram
    <version>/quarantine.jsonl  rows set aside, with reasons

``<version>`` is a content hash of the raw input bytes, the data config and the tokenizer's chat
template, so identical inputs give the identical version and any change gives a new one.
Versions are written to a temporary directory and moved into place in one step.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task

from configs.data_schema import DataConfig
from tasks.data.records import DataError, source_path
from tasks.files import read_pointer, sha256_file, swap_into_place, write_pointer

# Bump when the code changes what a given config and input produce, so old versions are not reused.
CURATION_FORMAT = 1
SPLITS = ("train", "validation", "test")
LATEST = "LATEST"


def data_root(home: Path) -> Path:
    """``<home>/data``."""
    return Path(home) / "data"


def version_dir(home: Path, version: str) -> Path:
    """Directory of one curated version."""
    return data_root(home) / version


def tokenizer_fingerprint(model_dir: Path) -> dict[str, str]:
    """Chat template and tokenizer vocabulary hash of an imported model (both shape the rendered data)."""
    model_dir = Path(model_dir)
    template_file = model_dir / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.is_file() else ""
    if not template:
        config = model_dir / "tokenizer_config.json"
        if config.is_file():
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template") or ""
    vocab = model_dir / "tokenizer.json"
    return {"chat_template": template, "tokenizer_sha256": sha256_file(vocab) if vocab.is_file() else ""}


def compute_version(cfg: DataConfig, fingerprint: dict[str, str]) -> str:
    """Content hash of the raw inputs, the data config and the chat template (12 hex digits).

    ``raw_dir`` is left out: it says where the files are, and their bytes are hashed instead.

    Raises:
        DataError: a source file is missing.
    """
    sources = []
    for source in cfg.sources:
        path = source_path(source, cfg.raw_dir)
        if not path.is_file():
            raise DataError(f"source {source.name!r}: file not found: {path}")
        sources.append({"name": source.name, "sha256": sha256_file(path)})
    payload = {
        "format": CURATION_FORMAT,
        "config": cfg.model_dump(mode="json", exclude={"raw_dir"}),
        "sources": sources,
        "chat_template": fingerprint.get("chat_template", ""),
        "tokenizer_sha256": fingerprint.get("tokenizer_sha256", ""),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds a fully written version (the card is written last)."""
    return (Path(path) / "card.json").is_file() and (Path(path) / "dataset" / "dataset_dict.json").is_file()


def read_latest(home: Path) -> str | None:
    """The newest version string, or None when nothing was curated yet."""
    return read_pointer(data_root(home) / LATEST)


def write_latest(home: Path, version: str) -> None:
    """Point ``LATEST`` at ``version`` (atomically)."""
    write_pointer(data_root(home) / LATEST, version)


def read_card(home: Path, version: str | None = None) -> dict[str, Any]:
    """The data card (card.json) of a version (None = LATEST)."""
    path = _resolve(home, version) / "card.json"
    return json.loads(path.read_text(encoding="utf-8"))


def load_curated(home: Path, version: str | None = None):
    """Load a curated data set as a ``datasets.DatasetDict`` (train, validation, test).

    Each record has id, task, source, input, messages, label (structured: decoded from the
    ``datasets.Json`` column), prompt, completion, n_tokens and template (paraphrase index).

    Args:
        home: the lmforge state directory.
        version: a data version; None = the one in ``<home>/data/LATEST``.

    Raises:
        DataError: nothing curated yet, or the version does not exist.
    """
    import datasets

    return datasets.load_from_disk(str(_resolve(home, version) / "dataset"))


def _resolve(home: Path, version: str | None) -> Path:
    version = version or read_latest(home)
    if version is None:
        raise DataError(f"no curated data under {data_root(home)}; run: lmforge curate")
    path = version_dir(home, version)
    if not is_complete(path):
        known = sorted(p.name for p in data_root(home).glob("*") if is_complete(p))
        raise DataError(f"data version {version!r} not found under {data_root(home)} "
                        f"(available: {', '.join(known) or 'none'})")
    return path


def write_version(home: Path, version: str, rows: dict[str, list[dict]], quarantine: list[dict],
                  card: dict[str, Any], card_md: str, lengths: dict[str, list[int]]) -> Path:
    """Write every file of a version into a temporary directory, then move it into place.

    Returns:
        The version directory.
    """
    import datasets
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    from tasks.data.card import plot_lengths

    root = data_root(home)
    root.mkdir(parents=True, exist_ok=True)
    target = version_dir(home, version)
    staging = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=root))
    try:
        features = _features()
        splits = {}
        for split in SPLITS:
            encoded = [{**row, "label": json.dumps(row["label"], ensure_ascii=False)} for row in rows[split]]
            splits[split] = datasets.Dataset.from_list(encoded, features=features)
            _write_jsonl(staging / f"{split}.jsonl", rows[split])
        bars_were_off = are_progress_bars_disabled()
        disable_progress_bars()  # three "Saving the dataset" bars per run are noise in the CLI
        try:
            datasets.DatasetDict(splits).save_to_disk(str(staging / "dataset"))
        finally:
            if not bars_were_off:
                enable_progress_bars()
        _write_jsonl(staging / "quarantine.jsonl", quarantine)
        plot_lengths(lengths, staging / "lengths.png")
        (staging / "card.md").write_text(card_md, encoding="utf-8")
        # card.json last: its presence marks a complete version (see is_complete).
        (staging / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        swap_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_latest(home, version)
    return target


def _features():
    from datasets import Features, Json, List, Value

    return Features({
        "id": Value("string"),
        "task": Value("string"),
        "source": Value("string"),
        "input": Value("string"),
        "messages": List({"role": Value("string"), "content": Value("string")}),
        # One column for every task's label shape (str or list of entities): stored as JSON text,
        # decoded back to the structured value on read.
        "label": Json(),
        "prompt": Value("string"),
        "completion": Value("string"),
        "n_tokens": Value("int32"),
        "template": Value("int32"),
    })


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


@task(name="data-version")
def data_version_task(cfg: DataConfig, model_dir: Path) -> str:
    """Prefect wrapper: the content-hash version of this curation's inputs."""
    return compute_version(cfg, tokenizer_fingerprint(model_dir))


@task(name="mark-latest-data")
def mark_latest_task(home: Path, version: str) -> str:
    """Prefect wrapper: point ``LATEST`` at the version this run produced or reused."""
    write_latest(home, version)
    return version
