"""Fault-tolerant checkpoints: atomic, checksummed, every N steps and on SIGTERM.

Layout under ``<run>/checkpoints/``::

    step-00000010/state.ckpt      Lightning checkpoint (adapters, optimiser, scheduler, loops, RNG)
    step-00000010/checksum.json   {"step": 10, "sha256": ..., "bytes": ...}, written last

A checkpoint is written into ``.tmp-step-...`` and renamed into place only after its checksum
file exists, so a crash leaves either a complete checkpoint or an ignorable temp dir. On resume
the newest checkpoint whose sha256 still matches is used; corrupt ones are reported and skipped.

SIGTERM is handled by Lightning (it sets ``trainer.received_sigterm`` and stops after the current
batch); :class:`FaultTolerantCheckpoint` saves a checkpoint right before that stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from tasks.files import atomic_write_text, sha256_file

log = logging.getLogger(__name__)

STATE_FILE = "state.ckpt"
CHECKSUM_FILE = "checksum.json"
PREFIX = "step-"


def checkpoint_dir(root: Path, step: int) -> Path:
    """Directory of the checkpoint taken after optimiser step ``step``."""
    return Path(root) / f"{PREFIX}{step:08d}"


def verify(path: Path) -> str | None:
    """None when the checkpoint dir is complete and its checksum matches, else the problem."""
    state, meta = Path(path) / STATE_FILE, Path(path) / CHECKSUM_FILE
    if not meta.is_file():
        return "no checksum.json (incomplete write)"
    if not state.is_file():
        return f"{STATE_FILE} is missing"
    try:
        expected = json.loads(meta.read_text())
    except ValueError:
        return "checksum.json is not valid JSON"
    size = state.stat().st_size
    if size != expected.get("bytes"):
        return f"{STATE_FILE} is {size} bytes, expected {expected.get('bytes')} (truncated?)"
    if sha256_file(state) != expected.get("sha256"):
        return f"sha256 of {STATE_FILE} does not match checksum.json (corrupt)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, dir) of every finished checkpoint dir under ``root``, newest first (unverified)."""
    found = []
    for path in Path(root).glob(f"{PREFIX}*") if Path(root).is_dir() else []:
        try:
            found.append((int(path.name[len(PREFIX):]), path))
        except ValueError:
            continue
    return sorted(found, reverse=True)


def latest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint whose checksum verifies, and one note per skipped bad checkpoint."""
    skipped: list[str] = []
    for _step, path in list_checkpoints(root):
        problem = verify(path)
        if problem is None:
            return path / STATE_FILE, skipped
        note = f"checkpoint {path.name} skipped: {problem}"
        log.warning(note)
        skipped.append(note)
    return None, skipped


def write_checksum(state: Path, step: int) -> None:
    """Write checksum.json next to ``state`` (atomically, via a temp file)."""
    payload = {"step": step, "sha256": sha256_file(state), "bytes": state.stat().st_size}
    atomic_write_text(state.parent / CHECKSUM_FILE, json.dumps(payload))


def prune(root: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest *valid* checkpoints (a corrupt one never counts)."""
    kept = 0
    for _, path in list_checkpoints(root):
        if kept < keep and verify(path) is None:
            kept += 1
            continue
        if kept >= keep:
            shutil.rmtree(path, ignore_errors=True)


class FaultTolerantCheckpoint(pl.Callback):
    """Save a checksummed checkpoint every ``every_n_steps`` optimiser steps, on SIGTERM, and at the end.

    Args:
        root: the run's ``checkpoints/`` directory.
        every_n_steps: checkpoint interval in optimiser steps.
        keep: how many valid checkpoints to keep.
    """

    def __init__(self, root: Path, every_n_steps: int, keep: int = 2):
        self.root = Path(root)
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.saved: list[int] = []
        self.stopped_by_sigterm = False

    def save(self, trainer: pl.Trainer) -> Path:
        """Write the checkpoint for the current global step (all ranks must call this)."""
        step = trainer.global_step
        final = checkpoint_dir(self.root, step)
        tmp = self.root / f".tmp-{final.name}"
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier("sft-checkpoint-mkdir")
        # Lightning gathers the state on every rank and writes it from rank 0 only.
        trainer.save_checkpoint(tmp / STATE_FILE)
        if trainer.is_global_zero:
            write_checksum(tmp / STATE_FILE, step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            prune(self.root, self.keep)
            log.info("checkpoint %s written", final.name)
        trainer.strategy.barrier("sft-checkpoint-done")
        self.saved.append(step)
        return final

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # mid-accumulation: only optimiser-step boundaries are resumable
        step = trainer.global_step
        if trainer.received_sigterm:
            # Lightning raises SIGTERMException right after this hook; save first.
            self.stopped_by_sigterm = True
            if step not in self.saved:
                self.save(trainer)
            return
        if step % self.every_n_steps == 0 and step not in self.saved:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step not in self.saved and trainer.global_step > 0:
            self.save(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            for stale in self.root.glob(".tmp-*"):  # leftovers of a write that was killed
                shutil.rmtree(stale, ignore_errors=True)
