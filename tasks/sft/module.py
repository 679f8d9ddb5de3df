"""LightningModule around a PEFT model: assistant-only loss, AdamW with warm-up + cosine decay.

The loss is computed from hidden states at the labelled positions only: the LM head (49k x 576
for SmolLM2, a fifth of the model) is applied to the few assistant tokens instead of every prompt
token, which saves time and the large logits tensor; the result equals the usual shifted
cross-entropy with ``-100`` labels.
"""

from __future__ import annotations

import hashlib
import math
import random
import resource
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import TQDMProgressBar

from configs.schema import SFTConfig
from tasks.sft.data import IGNORE_INDEX


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up to 1, then cosine decay to 0.1 at ``total`` steps."""
    if warmup and step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


class SFTModule(pl.LightningModule):
    """Trains the LoRA adapters of ``model`` (a PEFT model) with assistant-only cross-entropy.

    Checkpoints hold only the trainable (adapter) tensors plus optimiser, scheduler, loop and RNG
    state; the frozen base is rebuilt from the model store on resume.

    Args:
        model: a ``peft.PeftModel`` whose trainable parameters are the adapters.
        cfg: the ``sft`` config section.
    """

    def __init__(self, model, cfg: SFTConfig):
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; LoRA dropout must be active
        self.cfg = cfg
        self.strict_loading = False  # checkpoints carry the adapters only
        self._step_started: float | None = None
        self._window_tokens = 0
        self.tokens_seen = 0
        self.examples_seen = 0

    # ------------------------------------------------------------------ loss
    def _causal_lm(self):
        return self.model.get_base_model()

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy over labelled (assistant) tokens."""
        lm = self._causal_lm()
        decoder = getattr(lm, lm.base_model_prefix)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        hidden = decoder(**inputs, use_cache=False).last_hidden_state
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE_INDEX
        selected = hidden[:, :-1][keep]
        logits = lm.get_output_embeddings()(selected).float()
        return F.cross_entropy(logits, targets[keep])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self._step_started is None:
            self._step_started = time.perf_counter()
        loss = self.loss(batch)
        n_tokens = int(batch["n_tokens"])
        self._window_tokens += n_tokens
        self.tokens_seen += n_tokens
        self.examples_seen += int(batch["input_ids"].shape[0])
        self.log("train/loss", loss, on_step=True, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        elapsed = time.perf_counter() - (self._step_started or time.perf_counter())
        tokens = self._window_tokens * self.trainer.world_size  # all ranks process equal shares
        self._window_tokens, self._step_started = 0, None
        self.log("train/tokens_per_s", tokens / max(elapsed, 1e-9), prog_bar=True, rank_zero_only=True)
        self.log("train/lr", self.lr_schedulers().get_last_lr()[0], rank_zero_only=True)
        self.log("train/peak_rss_mb", peak_rss_mb(), rank_zero_only=True)

    # ------------------------------------------------------------------ optimiser
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)
        total, warmup = self.cfg.max_steps, self.cfg.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The adapter tensors, keyed like ``self.state_dict()``."""
        return {f"model.{n}": p.detach() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["state_dict"] = {k: v.clone() for k, v in self.trainable_state().items()}
        # Dropout draws from these generators; restoring them makes a resumed run bit-identical.
        # (numpy is not saved: nothing in training draws from it, and its state is not weights_only-safe.)
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        checkpoint["counters"] = {"tokens_seen": self.tokens_seen, "examples_seen": self.examples_seen}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        expected = set(self.trainable_state())
        missing = expected - set(checkpoint.get("state_dict", {}))
        if missing:
            raise ValueError(
                f"checkpoint does not match the adapter layout ({len(missing)} tensors missing, e.g. "
                f"{sorted(missing)[0]}); was it written with other sft.target_modules or lora_r?"
            )
        self._rng_to_restore = checkpoint.get("rng")
        counters = checkpoint.get("counters", {})
        self.tokens_seen = counters.get("tokens_seen", 0)
        self.examples_seen = counters.get("examples_seen", 0)

    def on_train_start(self) -> None:
        # Restored here, after Lightning's own setup, so nothing draws from the RNG in between.
        rng = getattr(self, "_rng_to_restore", None)
        if rng:
            torch.set_rng_state(rng["torch"])
            random.setstate(tuple(rng["python"]))
            self._rng_to_restore = None


def adapter_fingerprint(module: SFTModule) -> str:
    """sha256 over the adapter tensors (names and exact bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.trainable_state().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class TrainHistory(pl.Callback):
    """Collects the per-step loss and throughput, and at the end every rank's adapter hash.

    Must come before the checkpoint callback, so a checkpoint at step N includes step N.
    """

    def __init__(self):
        self.losses: list[tuple[int, float]] = []
        self.tokens_per_s: list[float] = []
        self.rank_fingerprints: list[str] = []
        self.rank_examples: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and "train/loss" in metrics:
            self.losses.append((trainer.global_step, float(metrics["train/loss"])))
            if "train/tokens_per_s" in metrics:
                self.tokens_per_s.append(float(metrics["train/tokens_per_s"]))

    def on_train_end(self, trainer, pl_module) -> None:
        # Equal hashes on every rank prove DDP kept the replicas in sync.
        mine = (adapter_fingerprint(pl_module), pl_module.examples_seen)
        gathered: list = [mine]
        if trainer.world_size > 1:
            import torch.distributed as dist

            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, mine)
        self.rank_fingerprints = [g[0] for g in gathered]
        self.rank_examples = [g[1] for g in gathered]

    def state_dict(self) -> dict[str, Any]:
        # Saved in every checkpoint, so a resumed run reports the whole run's curve.
        return {"losses": list(self.losses), "tokens_per_s": list(self.tokens_per_s)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.losses = [tuple(x) for x in state_dict.get("losses", [])]
        self.tokens_per_s = list(state_dict.get("tokens_per_s", []))

    def mean_tokens_per_s(self) -> float:
        """Mean throughput, leaving out the first step (allocations, lazy init) when there are more."""
        values = self.tokens_per_s[1:] or self.tokens_per_s
        return sum(values) / len(values) if values else 0.0


class StepProgressBar(TQDMProgressBar):
    """TQDM bar counted in micro-batches of the whole run (also after a resume, which skips the epoch-start hook)."""

    @property
    def total_train_batches(self) -> int:
        return self.trainer.max_steps * self.trainer.accumulate_grad_batches

    def on_train_start(self, trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self.train_progress_bar.reset(total=self.total_train_batches)
        self.train_progress_bar.set_description("sft")

    def on_train_epoch_start(self, trainer, *args) -> None:
        pass  # one endless epoch: the bar set up in on_train_start covers the run


def curve_steps(max_steps: int, points: int) -> list[int]:
    """Evenly spaced optimiser steps for learning-curve snapshots, ending at ``max_steps`` (points >= 1)."""
    if points <= 0:
        return []
    return sorted({max(1, round(max_steps * (i + 1) / points)) for i in range(points)})


class AdapterSnapshots(pl.Callback):
    """Saves the adapter at chosen steps into ``<root>/step-NNNNNNNN/`` and the training seconds so far
    into ``<root>/curve.json``, so the flow can score a learning curve after training (vs step and time).

    The last step is not snapshotted here: it is the final adapter, saved by the trainer.
    """

    def __init__(self, root, steps: list[int]):
        from pathlib import Path

        self.root, self.steps = Path(root), set(steps)
        self._started: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._started = time.perf_counter()
        # A resumed run continues the clock from its last snapshot (the time after it is lost with the crash).
        self._offset = max([0.0, *[p["train_seconds"] for p in self._points()]])

    def _points(self) -> list[dict]:
        import json

        index = self.root / "curve.json"
        return json.loads(index.read_text())["points"] if index.is_file() else []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import json

        from tasks.files import atomic_write_text

        step = trainer.global_step
        if (batch_idx + 1) % trainer.accumulate_grad_batches or step not in self.steps or step >= trainer.max_steps:
            return
        if not trainer.is_global_zero:
            return
        target = self.root / f"step-{step:08d}"
        pl_module.model.save_pretrained(str(target))
        points = [p for p in self._points() if p["step"] != step]
        seconds = self._offset + time.perf_counter() - (self._started or time.perf_counter())
        points.append({"step": step, "train_seconds": round(seconds, 2), "adapter_dir": str(target),
                       "examples_seen": pl_module.examples_seen})
        atomic_write_text(self.root / "curve.json", json.dumps({"points": sorted(points, key=lambda p: p["step"])},
                                                               indent=1))
