"""One curation run: load -> clean -> split -> dedup -> sample -> render -> write, with a data card.

Order of decisions, and why:

1. Splits are assigned per *group* by a seeded hash (a DialogSum dialogue feeds both summarization
   and generation, so both land in the same split). Hash assignment is stable: adding rows does
   not move the others.
2. Exact duplicates are dropped over the whole pool, test first, then validation, then train, so
   an evaluation example always wins over its training copy.
3. Selection walks each split in the same priority order, candidates in seeded-hash order. A
   candidate is rendered, its tokens counted, and it is checked against everything kept so far
   for near duplicates: one in another split (any task) is a leak and drops the candidate; one in
   the same split and task is a repeat and drops it too. Only kept examples can leak, so only the
   kept ones are indexed.
4. Training examples are shared out by source weight (water-filling: share a source cannot fill,
   because of its cap or supply, goes to the others), up to ``train_examples``.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from prefect import task

from configs.data_schema import TASKS, DataConfig
from tasks.data.card import length_summary, render_markdown
from tasks.data.cleaning import Cleaner
from tasks.data.dedup import NearDupIndex, exact_key
from tasks.data.loaders import load_source
from tasks.data.records import RawRecord, Rejected, check_sources, source_path, stable_unit
from tasks.data.store import (
    SPLITS,
    compute_version,
    is_complete,
    read_card,
    tokenizer_fingerprint,
    version_dir,
    write_latest,
    write_version,
)
from tasks.data.templates import count_tokens, render
from tasks.files import sha256_file

log = logging.getLogger(__name__)
_PRIORITY = {"test": 0, "validation": 1, "train": 2}


def assign_split(record: RawRecord, cfg: DataConfig) -> str:
    """The split of a record: fixed by its source's role, else by a seeded hash of its group."""
    if record.split_hint == "train":
        return "train"
    u = stable_unit("split", cfg.seed, record.group)
    if record.split_hint == "eval":
        return "validation" if u < 0.5 else "test"
    source = next((s for s in cfg.sources if s.name == record.source), None)
    test = source.test_fraction if source is not None and source.test_fraction is not None else cfg.test_fraction
    validation = (source.validation_fraction if source is not None and source.validation_fraction is not None
                  else cfg.validation_fraction)
    if u < test:
        return "test"
    return "validation" if u < test + validation else "train"


def allocate(total: int, weights: dict[str, float], limits: dict[str, int]) -> dict[str, int]:
    """Share ``total`` by weight without exceeding per-key limits; unfillable share goes to the rest.

    Integer shares use largest remainders, ties broken by key, so the result is deterministic.
    """
    alloc = dict.fromkeys(weights, 0)
    active = sorted(k for k in weights if weights[k] > 0 and limits.get(k, 0) > 0)
    remaining = total
    while active and remaining > 0:
        wsum = sum(weights[k] for k in active)
        shares = {k: remaining * weights[k] / wsum for k in active}
        full = [k for k in active if alloc[k] + shares[k] >= limits[k]]
        if not full:
            floors = {k: int(shares[k]) for k in active}
            spare = remaining - sum(floors.values())
            for k in sorted(active, key=lambda k: (-(shares[k] - floors[k]), k))[:spare]:
                floors[k] += 1
            for k in active:
                alloc[k] += floors[k]
            break
        for k in full:
            remaining -= limits[k] - alloc[k]
            alloc[k] = limits[k]
            active.remove(k)
    return alloc


class _Selector:
    """Renders candidates and keeps those that fit the token bound and duplicate nobody kept."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.index = NearDupIndex(cfg.dedup) if cfg.dedup.near else None
        self.kept_meta: dict[str, tuple[str, str]] = {}
        self.rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
        self.rejected: list[Rejected] = []
        self.near: collections.Counter[str] = collections.Counter()

    def offer(self, record: RawRecord, split: str) -> bool:
        rendered = render(record.id, record.task, record.input, record.label,
                          self.cfg.templates[record.task], self.tokenizer, self.cfg.seed)
        n_tokens = count_tokens(self.tokenizer, rendered["prompt"], rendered["completion"])
        limit = self.cfg.lengths.max_tokens
        if limit is not None and n_tokens > limit:
            self.rejected.append(Rejected(record.source, record.line, "render",
                                          f"too many tokens ({n_tokens} > {limit})", record.input[:160]))
            return False
        prepared = None
        if self.index is not None:
            prepared = self.index.prepare(record.input)
            for key, _score in self.index.query(prepared):
                other_split, other_task = self.kept_meta[key]
                if other_split != split:
                    self.near["cross"] += 1
                    return False
                if other_task == record.task:
                    self.near["within"] += 1
                    return False
            self.index.add(record.id, prepared)
        self.kept_meta[record.id] = (split, record.task)
        self.rows[split].append({
            "id": record.id, "task": record.task, "source": record.source, "input": record.input,
            "messages": rendered["messages"], "label": record.label, "prompt": rendered["prompt"],
            "completion": rendered["completion"], "n_tokens": n_tokens, "template": rendered["template"],
        })
        return True


def build_dataset(cfg: DataConfig, home: Path, model_dir: Path, version: str | None = None,
                  force: bool = False) -> dict[str, Any]:
    """Curate the configured sources into ``<home>/data/<version>/`` (or reuse an existing version).

    Args:
        cfg: the ``data`` config section.
        home: lmforge state directory.
        model_dir: imported base model (its tokenizer's chat template renders the prompts).
        version: precomputed version (see :func:`tasks.data.store.compute_version`); None = compute.
        force: rebuild even when the version already exists.

    Returns:
        Summary: version, path, reused, counts per split and task, seconds, card_md.

    Raises:
        DataError: a source file is missing or unreadable.
    """
    from tasks.models import load_tokenizer

    started = time.perf_counter()
    check_sources(cfg.sources, cfg.raw_dir)
    version = version or compute_version(cfg, tokenizer_fingerprint(model_dir))
    out = version_dir(home, version)
    if is_complete(out) and not force:
        write_latest(home, version)
        log.info("data version %s already curated at %s, reusing it", version, out)
        return _summary(read_card(home, version), out, reused=True)

    tokenizer = load_tokenizer(model_dir)
    card_sources: dict[str, dict[str, Any]] = {}
    records: list[RawRecord] = []
    rejected: list[Rejected] = []
    cleaner = Cleaner(cfg.active_rules())
    for source in cfg.sources:
        loaded, bad = load_source(source, cfg.raw_dir)
        cleaned = [cleaner.clean_record(r, cfg.lengths) for r in loaded]
        good = [r for r in cleaned if isinstance(r, RawRecord)]
        bad += [r for r in cleaned if isinstance(r, Rejected)]
        records += good
        rejected += bad
        card_sources[source.name] = {
            "task": source.task, "split": source.split, "format": source.format, "path": str(source.path),
            "sha256": sha256_file(source_path(source, cfg.raw_dir)), "read": len(loaded) + sum(
                r.stage == "load" for r in bad), "quarantined": len(bad), "cleaned": len(good),
            "train_quota": 0, "train_taken": 0,
        }

    pools, exact = _exact_dedup(records, cfg)
    selector = _Selector(cfg, tokenizer)
    for split in ("test", "validation"):
        for task_name in TASKS:
            candidates = [r for r in pools[split] if r.task == task_name]
            taken = 0
            for record in candidates:
                if taken >= cfg.eval_examples_per_task:
                    break
                taken += selector.offer(record, split)
    _select_train(cfg, pools["train"], selector, card_sources)
    rejected += selector.rejected

    rows = {split: sorted(selector.rows[split], key=lambda r: stable_unit("order", cfg.seed, r["id"]))
            for split in SPLITS}
    lengths = collections.defaultdict(list)
    for split in SPLITS:
        for row in rows[split]:
            lengths[row["task"]].append(row["n_tokens"])
    card = _card(cfg, version, rows, rejected, cleaner, exact, selector.near, card_sources, lengths)
    card["seconds"] = round(time.perf_counter() - started, 1)
    card_md = render_markdown(card)
    path = write_version(home, version, rows, [r.to_dict() for r in rejected], card, card_md, dict(lengths))
    log.info("curated data version %s into %s in %.1fs", version, path, card["seconds"])
    return _summary(card, path, reused=False)


def _exact_dedup(records: list[RawRecord], cfg: DataConfig) -> tuple[dict[str, list[RawRecord]], dict[str, int]]:
    """Split the pool and drop exact duplicates; returns candidates per split in selection order."""
    placed = [(assign_split(r, cfg), r) for r in records]
    placed.sort(key=lambda p: (_PRIORITY[p[0]], stable_unit("order", cfg.seed, p[1].id), p[1].id))
    seen: dict[str, tuple[str, set[str]]] = {}
    pools: dict[str, list[RawRecord]] = {split: [] for split in SPLITS}
    counts = {"exact_within": 0, "exact_cross": 0}
    for split, record in placed:
        if cfg.dedup.exact:
            key = exact_key(record.input)
            first_split, tasks = seen.setdefault(key, (split, set()))
            if first_split != split:
                counts["exact_cross"] += 1
                continue
            if record.task in tasks:
                counts["exact_within"] += 1
                continue
            tasks.add(record.task)
        pools[split].append(record)
    return pools, counts


def _select_train(cfg: DataConfig, pool: list[RawRecord], selector: _Selector, card_sources: dict) -> None:
    by_source: dict[str, list[RawRecord]] = collections.defaultdict(list)
    for record in pool:
        by_source[record.source].append(record)
    sources = [s for s in cfg.sources if by_source.get(s.name)]
    weights = {s.name: s.weight for s in sources}
    caps = {s.name: min(s.cap if s.cap is not None else len(by_source[s.name]), len(by_source[s.name]))
            for s in sources}
    cursor = {s.name: 0 for s in sources}
    taken = {s.name: 0 for s in sources}
    while True:
        quota = allocate(cfg.train_examples, weights, caps)
        progressed = False
        for source in sources:
            name, candidates = source.name, by_source[source.name]
            while taken[name] < quota[name] and cursor[name] < len(candidates):
                taken[name] += selector.offer(candidates[cursor[name]], "train")
                cursor[name] += 1
                progressed = True
            card_sources[name]["train_quota"] = quota[name]
            if cursor[name] >= len(candidates):
                caps[name] = taken[name]  # exhausted (duplicates, token bound): let others fill the gap
        if not progressed or sum(taken.values()) >= cfg.train_examples:
            break
    for name, count in taken.items():
        card_sources[name]["train_taken"] = count


def _card(cfg, version, rows, rejected, cleaner, exact, near, card_sources, lengths) -> dict[str, Any]:
    counts = {split: dict(collections.Counter(r["task"] for r in rows[split])) for split in SPLITS}
    for split in SPLITS:
        counts[split]["total"] = len(rows[split])
    quarantine = collections.Counter((r.source, r.stage, r.kind) for r in rejected)
    return {
        "version": version,
        "seed": cfg.seed,
        "total": sum(len(rows[s]) for s in SPLITS),
        "counts": counts,
        "sources": card_sources,
        "rules": {name: {"hits": cleaner.hits[name], "records": cleaner.records[name]} for name in cleaner.hits},
        "dedup": {**exact, "near_within": near["within"], "near_cross": near["cross"],
                  "threshold": cfg.dedup.threshold},
        "quarantine": [{"source": s, "stage": st, "kind": k, "count": n}
                       for (s, st, k), n in sorted(quarantine.items())],
        "quarantined": len(rejected),
        "tokens": {task: length_summary(values) for task, values in lengths.items()},
        "config_sha256": hashlib.sha256(cfg.model_dump_json(exclude={"raw_dir"}).encode()).hexdigest()[:12],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _summary(card: dict[str, Any], path: Path, reused: bool) -> dict[str, Any]:
    return {"version": card["version"], "path": str(path), "reused": reused, "counts": card["counts"],
            "total": card["total"], "quarantined": card["quarantined"], "seconds": card["seconds"],
            "card_md": str(Path(path) / "card.md")}


def _cache_key(_context, parameters: dict[str, Any]) -> str:
    # Keyed on the content hash *and* the state dir: the same data in another home is another output.
    home = hashlib.sha256(str(Path(parameters["home"]).resolve()).encode()).hexdigest()[:8]
    return f"curate-{parameters['version']}-{home}"


@task(name="build-dataset", cache_key_fn=_cache_key, persist_result=True)
def build_dataset_task(cfg: DataConfig, home: Path, model_dir: Path, version: str, force: bool = False) -> dict:
    """Prefect wrapper: curate (cached on the content-hash version and the state dir)."""
    return build_dataset(cfg, home, model_dir, version=version, force=force)
