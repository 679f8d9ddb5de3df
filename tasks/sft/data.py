"""SFT data: tokenise curated records with assistant-only labels and batch them deterministically.

A record (schema in the project brief) becomes ``prompt ids + completion ids + end-of-turn``; the
labels are ``-100`` on the prompt, so the loss only sees what the assistant says (including the
end-of-turn token, which teaches the model to stop).

Batches come from a *step-indexed* stream: the batch for global micro-batch ``i`` is a pure
function of ``(seed, i)``. Resuming at optimiser step ``s`` therefore only needs ``s``: the stream
restarts at ``s * grad_accum`` and yields exactly what an uninterrupted run would have seen. Two
layouts exist:

* length bucketing (default): each epoch is a seeded permutation, cut into chunks of 50 batches,
  each chunk sorted by length, so a batch holds similar lengths and wastes little padding;
* packing: whole examples are packed first-fit into rows of ``max_seq_len`` tokens; position ids
  restart at 0 for every example and transformers turns that into a block-diagonal causal mask,
  so packed examples never attend to each other.

Under DDP every rank reads the same global batch and keeps its own slice of it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
BUCKET_CHUNK = 50  # batches per sorted chunk: enough to group lengths, small enough to stay random


class SFTDataError(ValueError):
    """Training data that cannot be used, with the record or field at fault."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One tokenised training example."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclasses.dataclass
class EncodeReport:
    """What encoding kept and dropped (written to metrics.json and MLflow)."""

    total: int = 0
    kept: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    assistant_tokens: int = 0
    longest: int = 0


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn in the chat template (not ``eos_token``, which
    some converted tokenizers get wrong)."""
    from tasks.evaluate import stop_token_ids

    return stop_token_ids(tokenizer)[0]


def encode_records(
    records: Iterable[dict[str, Any]],
    tokenizer,
    max_seq_len: int,
    context_length: int | None = None,
) -> tuple[list[Encoded], EncodeReport]:
    """Tokenise records into prompt + completion + end-of-turn with assistant-only labels.

    Args:
        records: curated records (dicts or a ``datasets.Dataset``) with ``prompt`` and ``completion``.
        tokenizer: the base model's tokenizer.
        max_seq_len: longer examples are dropped (and counted), never silently truncated.
        context_length: the model's context; ``max_seq_len`` beyond it is an error.

    Raises:
        SFTDataError: no records, a record without prompt/completion, ``max_seq_len`` beyond the
            model's context, or every record longer than ``max_seq_len``.
    """
    if context_length is not None and max_seq_len > context_length:
        raise SFTDataError(
            f"model.max_seq_len={max_seq_len} is longer than the model's context ({context_length} tokens); "
            f"set model.max_seq_len <= {context_length}"
        )
    eot = end_of_turn_id(tokenizer)
    report = EncodeReport()
    encoded: list[Encoded] = []
    too_long: list[tuple[str, int]] = []
    for index, record in enumerate(records):
        report.total += 1
        ident = record.get("id", f"#{index}") if isinstance(record, dict) else f"#{index}"
        prompt, completion = _fields(record, ident)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eot]
        length = len(prompt_ids) + len(answer_ids)
        if context_length is not None and length > context_length:
            raise SFTDataError(
                f"record {ident!r} is {length} tokens, longer than the model's context ({context_length})"
            )
        if length > max_seq_len:
            too_long.append((ident, length))
            continue
        encoded.append(Encoded(prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids))
        report.tokens += length
        report.assistant_tokens += len(answer_ids)
        report.longest = max(report.longest, length)
    report.kept = len(encoded)
    report.dropped_too_long = len(too_long)
    if report.total == 0:
        raise SFTDataError("the training set is empty: no records to fine-tune on (check the curated data version)")
    if too_long:
        example = ", ".join(f"{i} ({n} tokens)" for i, n in too_long[:3])
        log.warning("dropped %d of %d records longer than max_seq_len=%d, e.g. %s",
                    len(too_long), report.total, max_seq_len, example)
    if not encoded:
        raise SFTDataError(
            f"all {report.total} records are longer than model.max_seq_len={max_seq_len} tokens "
            f"(e.g. {too_long[0][0]!r}: {too_long[0][1]} tokens); raise model.max_seq_len"
        )
    return encoded, report


def validation_records(home: Path, version: str, tasks: Sequence[str] | None) -> list[dict[str, Any]]:
    """Validation records of the trained tasks (all tasks when None): what SFT and alignment score."""
    from tasks.data import load_curated

    return select_records(load_curated(home, version)["validation"], tasks)


def select_records(records: Iterable[dict[str, Any]], tasks: Sequence[str] | None = None,
                   max_per_task: int | dict[str, int] | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Records of the chosen tasks, at most ``max_per_task`` each (a seeded sample), in input order.

    Args:
        records: curated records or a ``datasets.Dataset`` split.
        tasks: task names to keep; None keeps every task.
        max_per_task: cap for every task, or task -> cap (unnamed tasks uncapped); None keeps all.
        seed: sampling seed (the same seed and input give the same selection).
    """
    rows = [dict(r) for r in records]
    if tasks is not None:
        rows = [r for r in rows if r.get("task") in set(tasks)]
    if max_per_task is None:
        return rows
    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        by_task.setdefault(str(row.get("task")), []).append(index)
    keep: set[int] = set()
    for task_name, indices in sorted(by_task.items()):
        cap = max_per_task.get(task_name, len(indices)) if isinstance(max_per_task, dict) else max_per_task
        chosen = rng.permutation(len(indices))[:cap]
        keep.update(indices[i] for i in chosen)
    return [row for index, row in enumerate(rows) if index in keep]


def _fields(record: Any, ident: str) -> tuple[str, str]:
    try:
        prompt, completion = record["prompt"], record["completion"]
    except (KeyError, TypeError):
        raise SFTDataError(f"record {ident!r} has no 'prompt'/'completion' (curated record schema)") from None
    if not isinstance(prompt, str) or not prompt or not isinstance(completion, str) or not completion:
        raise SFTDataError(f"record {ident!r}: 'prompt' and 'completion' must be non-empty strings")
    return prompt, completion


# --------------------------------------------------------------------------- batch stream
def _epoch_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Length-bucketed global batches of one epoch (the last partial batch is dropped)."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    usable = (len(order) // global_batch) * global_batch
    order = order[:usable]
    chunk = global_batch * BUCKET_CHUNK
    batches: list[np.ndarray] = []
    for start in range(0, usable, chunk):
        part = order[start : start + chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches.extend(part[i : i + global_batch] for i in range(0, len(part), global_batch))
    return [batches[i] for i in rng.permutation(len(batches))]


def pack_rows(examples: Sequence[Encoded], max_seq_len: int, seed: int) -> list[list[int]]:
    """First-fit packing of a seeded permutation of examples into rows of at most ``max_seq_len``."""
    rng = np.random.default_rng([seed, 1])
    rows: list[list[int]] = []
    space: list[int] = []
    for index in rng.permutation(len(examples)).tolist():
        size = len(examples[index])
        slot = next((r for r, free in enumerate(space) if free >= size), None)
        if slot is None:
            rows.append([index])
            space.append(max_seq_len - size)
        else:
            rows[slot].append(index)
            space[slot] -= size
    return rows


class BatchStream(IterableDataset):
    """Endless, deterministic stream of this rank's micro-batches, starting at ``start``.

    Args:
        examples: encoded examples.
        batch_size: sequences (rows) per rank per micro-batch.
        world_size: ranks sharing each global batch.
        rank: this rank.
        seed: data-order seed.
        packing: pack examples into rows instead of padding them.
        max_seq_len: row length when packing.
        pad_id: padding token id.
        start: global micro-batch index to begin at (``global_step * grad_accum`` on resume).
    """

    def __init__(self, examples: Sequence[Encoded], batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, packing: bool = False, max_seq_len: int = 512, pad_id: int = 0, start: int = 0):
        super().__init__()
        self.examples = list(examples)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.packing = packing
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.start = start
        self._lengths = np.array([len(e) for e in self.examples])
        global_batch = batch_size * world_size
        # Rows are packed once; epochs only reorder them, so every epoch has the same length.
        self._rows = pack_rows(self.examples, max_seq_len, seed) if packing else None
        units = len(self._rows) if self._rows is not None else len(self.examples)
        if units < global_batch:
            what = "packed rows" if packing else "examples"
            raise SFTDataError(
                f"{units} {what} cannot fill one batch of {batch_size} x {world_size} rank(s); "
                f"lower sft.batch_size or add training data"
            )
        self.batches_per_epoch = units // global_batch

    def epoch_layout(self, epoch: int) -> list[list[list[int]]]:
        """Global batches of ``epoch``: each a list of rows, each row a list of example indices."""
        global_size = self.batch_size * self.world_size
        if self._rows is not None:
            order = np.random.default_rng([self.seed, epoch, 2]).permutation(len(self._rows))
            return [[self._rows[i] for i in order[b * global_size : (b + 1) * global_size]]
                    for b in range(self.batches_per_epoch)]
        return [[[int(i)] for i in batch] for batch in _epoch_batches(self._lengths, global_size, self.seed, epoch)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        from torch.utils.data import get_worker_info

        # With N DataLoader workers, worker w makes every N-th batch; the loader reads workers
        # round-robin, so the order is exactly the single-process order.
        worker = get_worker_info()
        stride, index = (worker.num_workers, self.start + worker.id) if worker else (1, self.start)
        cached_epoch = -1
        cached: list[list[list[int]]] = []  # filled on the first pass (no epoch is -1)
        while True:
            epoch, position = divmod(index, self.batches_per_epoch)
            if epoch != cached_epoch:  # an epoch's layout is computed once, not per batch
                cached_epoch = epoch
                cached = self.epoch_layout(epoch)
            rows = cached[position][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            yield collate([[self.examples[i] for i in row] for row in rows], self.pad_id, self.packing)
            index += stride


def collate(rows: list[list[Encoded]], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Right-padded tensors; packed rows get restarting position ids and no attention mask."""
    width = max(sum(len(e) for e in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        offset = 0
        for example in row:
            n = len(example)
            input_ids[r, offset : offset + n] = torch.tensor(example.input_ids)
            labels[r, offset : offset + n] = torch.tensor(example.labels)
            attention[r, offset : offset + n] = 1
            positions[r, offset : offset + n] = torch.arange(n)
            offset += n
        # Padding continues its own position run so it forms a separate (ignored) packed segment.
        positions[r, offset:] = torch.arange(width - offset)
    batch = {"input_ids": input_ids, "labels": labels, "n_tokens": attention.sum()}
    if packing:
        batch["position_ids"] = positions
    else:
        batch["attention_mask"] = attention
    return batch


# --------------------------------------------------------------------------- datamodule
class SFTDataModule(pl.LightningDataModule):
    """Lightning data module over encoded examples; resumes at the trainer's restored global step.

    Args:
        examples: output of :func:`encode_records`.
        batch_size: sequences per device per micro-batch.
        grad_accum: micro-batches per optimiser step.
        seed: data-order seed.
        packing: pack examples into ``max_seq_len`` rows.
        max_seq_len: row length when packing.
        pad_id: padding token id.
        num_workers: DataLoader worker processes.
    """

    def __init__(self, examples: Sequence[Encoded], batch_size: int, grad_accum: int = 1, seed: int = 0,
                 packing: bool = False, max_seq_len: int = 512, pad_id: int = 0, num_workers: int = 0):
        super().__init__()
        self.examples = list(examples)
        self.batch_size = batch_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.packing = packing
        self.max_seq_len = max_seq_len
        self.pad_id = pad_id
        self.num_workers = num_workers
        self.stream: BatchStream | None = None

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer else (1, 0)
        # Lightning restores the loop state before asking for data, so global_step is the resume point.
        start = trainer.global_step * self.grad_accum if trainer else 0
        self.stream = BatchStream(self.examples, self.batch_size, world, rank, self.seed, self.packing,
                                  self.max_seq_len, self.pad_id, start)
        return DataLoader(
            self.stream,
            batch_size=None,
            num_workers=self.num_workers,
            # A private generator keeps DataLoader seeding from consuming the global RNG, whose
            # state (dropout) is checkpointed and must match between a resumed and a straight run.
            generator=torch.Generator().manual_seed(self.seed),
            persistent_workers=False,
        )

    def steps_per_epoch(self, world_size: int = 1) -> float:
        """Optimiser steps per pass over the data (for logs)."""
        units = len(self.examples)
        return units / max(1, self.batch_size * world_size * self.grad_accum) if units else math.nan
