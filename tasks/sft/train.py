"""Run one SFT training: records + base model + ``sft`` config -> adapter, metrics, checkpoints.

:func:`train_sft` is the plain function (tests call it). Multi-process strategies need Lightning to
re-launch the *script* it runs in, so :func:`run_training` starts ``python -m tasks.sft.train
<spec.json>`` for them (and whenever asked), which is also the entry point a cluster launcher
(torchrun, SLURM) would call on every node.

Run directory (``<home>/runs/sft/<run_name>/``)::

    spec.json        what to train (this file is all the subprocess needs)
    train.jsonl      the exact training records
    checkpoints/     checksummed resumable checkpoints (see tasks.sft.checkpoints)
    adapter/         PEFT adapter (adapter_config.json + adapter_model.safetensors) + tokenizer
    metrics.json     training summary (loss curve, tokens/s, peak RSS, per-rank adapter hashes)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from configs.schema import SFTConfig
from tasks.files import atomic_write_text, swap_into_place
from tasks.runtime import torch_threads

log = logging.getLogger(__name__)

EXIT_SIGTERM = 143  # the conventional 128 + SIGTERM
ERROR_FILE = "error.json"


class SFTInterrupted(RuntimeError):
    """Training stopped on SIGTERM after writing a checkpoint; resume with ``--resume``."""


@dataclasses.dataclass
class TrainSpec:
    """Everything one training run needs, JSON-serialisable (written to ``<run_dir>/spec.json``)."""

    run_dir: str
    model_dir: str
    sft: dict[str, Any]
    max_seq_len: int
    records_path: str | None = None
    resume: bool = False
    tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    progress_bar: bool = True

    def save(self) -> Path:
        """Write the spec atomically into the run dir and return its path."""
        path = Path(self.run_dir) / "spec.json"
        atomic_write_text(path, json.dumps(dataclasses.asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> TrainSpec:
        """Read a spec written by :meth:`save`."""
        return cls(**json.loads(Path(path).read_text()))


def write_records(records, path: Path) -> int:
    """Write training records as JSON lines (atomically); returns how many."""
    lines = [json.dumps(dict(r), ensure_ascii=False) for r in records]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records from a JSON-lines file, naming the line of any bad JSON."""
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: invalid JSON ({err})") from None
    return records


def needs_subprocess(cfg: SFTConfig) -> bool:
    """Whether Lightning must launch its own processes (anything beyond one local process)."""
    return cfg.strategy != "auto" or cfg.devices != 1 or cfg.num_nodes != 1


def cpu_threads(cfg: SFTConfig) -> int:
    """Intra-op threads for one training process: the configured number, else physical cores / local ranks."""
    from tasks.runtime import physical_cores

    if cfg.cpu_threads:
        return cfg.cpu_threads
    local = cfg.devices if isinstance(cfg.devices, int) and cfg.accelerator != "gpu" else 1
    return max(1, physical_cores() // max(1, local))


def resolve_precision(cfg: SFTConfig) -> str:
    """The Lightning precision for ``cfg``: 'auto' -> 'bf16-mixed' where bf16 is native, else '32-true'."""
    if cfg.precision != "auto":
        return cfg.precision
    from tasks.runtime import bf16_fast

    device = "cuda" if cfg.accelerator == "gpu" else "cpu" if cfg.accelerator == "cpu" else None
    return "bf16-mixed" if bf16_fast(device) else "32-true"


# --------------------------------------------------------------------------- training
def train_sft(spec: TrainSpec, records: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train LoRA adapters as described by ``spec``; returns the summary also written to metrics.json.

    Args:
        spec: run description; ``records_path`` is read when ``records`` is None.
        records: curated records (schema in the project brief) to train on.

    Raises:
        SFTDataError / SFTModelError: bad data or model/adapter config (clear message).
        SFTInterrupted: SIGTERM arrived; a checkpoint was written first.
    """
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from tasks.models import load_tokenizer
    from tasks.sft.checkpoints import FaultTolerantCheckpoint, latest_valid, list_checkpoints
    from tasks.sft.data import SFTDataModule, encode_records, end_of_turn_id
    from tasks.sft.module import (
        AdapterSnapshots,
        SFTModule,
        StepProgressBar,
        TrainHistory,
        adapter_fingerprint,
        curve_steps,
        peak_rss_mb,
    )
    from tasks.sft.qlora import build_peft_model, context_length

    cfg = SFTConfig.model_validate(spec.sft)
    run_dir = Path(spec.run_dir)
    ckpt_root = run_dir / "checkpoints"
    if records is None:
        if not spec.records_path:
            raise ValueError("TrainSpec needs records_path when no records are passed")
        records = read_records(Path(spec.records_path))

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    tokenizer = load_tokenizer(Path(spec.model_dir))
    precision = resolve_precision(cfg)
    model = build_peft_model(Path(spec.model_dir), cfg, gradient_checkpointing=cfg.gradient_checkpointing,
                             compute_dtype="bfloat16" if precision.startswith("bf16") else "float32")
    examples, report = encode_records(records, tokenizer, spec.max_seq_len, context_length(model))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    datamodule = SFTDataModule(examples, cfg.batch_size, cfg.grad_accum, cfg.seed, cfg.packing,
                               spec.max_seq_len, pad_id, cfg.num_workers)
    module = SFTModule(model, cfg)

    resume_from, skipped = (latest_valid(ckpt_root) if spec.resume else (None, []))
    if spec.resume and resume_from is None:
        log.warning("--resume: no valid checkpoint in %s, starting from step 0", ckpt_root)
    checkpointer = FaultTolerantCheckpoint(ckpt_root, cfg.checkpoint_every_n_steps, cfg.keep_checkpoints)
    history = TrainHistory()
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        strategy=cfg.strategy,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        precision=precision,
        max_steps=cfg.max_steps,
        max_epochs=-1,
        accumulate_grad_batches=cfg.grad_accum,
        gradient_clip_val=cfg.max_grad_norm,
        logger=_mlflow_logger(spec),
        callbacks=[history, checkpointer,
                   AdapterSnapshots(run_dir / "curve", curve_steps(cfg.max_steps, cfg.curve_points)),
                   *([StepProgressBar()] if spec.progress_bar else [])],
        enable_checkpointing=False,
        enable_progress_bar=spec.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
        default_root_dir=str(run_dir),
    )
    started = time.perf_counter()
    try:
        # Restored afterwards: the caller's process (e.g. a test session) keeps its own setting.
        with torch_threads(cpu_threads(cfg)):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume_from) if resume_from else None)
    except SIGTERMException:
        raise SFTInterrupted(
            f"stopped on SIGTERM at step {trainer.global_step}; checkpoint in {ckpt_root}; "
            f"continue with `lmforge finetune --resume`"
        ) from None
    seconds = time.perf_counter() - started

    summary = {
        "steps": trainer.global_step,
        "resumed_from": str(resume_from) if resume_from else None,
        "skipped_checkpoints": skipped,
        "train_seconds": round(seconds, 2),
        "world_size": trainer.world_size,
        "loss_curve": history.losses,
        "final_loss": history.losses[-1][1] if history.losses else None,
        "tokens_seen": module.tokens_seen * trainer.world_size,
        "tokens_per_s": round(history.mean_tokens_per_s(), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        # A resume of a finished run never reaches on_train_end: fall back to this process's view.
        "rank_adapter_sha256": history.rank_fingerprints or [adapter_fingerprint(module)],
        "rank_examples_seen": history.rank_examples or [module.examples_seen],
        "data": dataclasses.asdict(report),
        "method": cfg.method,
        "precision": precision,
        "cpu_threads": cpu_threads(cfg),
        "model_footprint_mb": round(model.get_base_model().get_memory_footprint() / 2**20, 1),
        "adapter_dir": str(run_dir / "adapter"),
        "checkpoints": [p.name for _, p in list_checkpoints(ckpt_root)],
    }
    if trainer.is_global_zero:
        _save_adapter(model, tokenizer, run_dir / "adapter")
        atomic_write_text(run_dir / "metrics.json", json.dumps(summary, indent=2))
    return summary


def _mlflow_logger(spec: TrainSpec):
    if not spec.mlflow_run_id:
        return False
    from pytorch_lightning.loggers import MLFlowLogger

    return MLFlowLogger(tracking_uri=spec.tracking_uri, run_id=spec.mlflow_run_id)


def _save_adapter(model, tokenizer, target: Path) -> None:
    """PEFT save_pretrained into a temp dir, then swap it into place."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    swap_into_place(tmp, target)


# --------------------------------------------------------------------------- subprocess
def run_training(spec: TrainSpec, records: list[dict[str, Any]] | None = None,
                 subprocess_mode: bool | None = None) -> dict[str, Any]:
    """Train in this process, or in ``python -m tasks.sft.train`` when the strategy needs it.

    Args:
        spec: run description (``records_path`` must exist for the subprocess mode).
        records: records for in-process training (else read from ``spec.records_path``).
        subprocess_mode: force either mode; None = subprocess only for multi-process strategies.
    """
    cfg = SFTConfig.model_validate(spec.sft)
    if not (needs_subprocess(cfg) if subprocess_mode is None else subprocess_mode):
        return train_sft(spec, records)
    spec_path = spec.save()
    proc = subprocess.Popen([sys.executable, "-m", "tasks.sft.train", str(spec_path)], cwd=_repo_root())
    code = _wait_forwarding_sigterm(proc)
    if code == EXIT_SIGTERM:
        raise SFTInterrupted(f"training stopped on SIGTERM; checkpoints in {Path(spec.run_dir) / 'checkpoints'}; "
                             f"continue with `lmforge finetune --resume`")
    if code != 0:
        _raise_child_error(Path(spec.run_dir))
        raise RuntimeError(f"training subprocess failed with exit code {code} (see its output above)")
    return json.loads((Path(spec.run_dir) / "metrics.json").read_text())


def _raise_child_error(run_dir: Path) -> None:
    from tasks.sft.data import SFTDataError
    from tasks.sft.qlora import SFTModelError

    path = run_dir / ERROR_FILE
    if not path.is_file():
        return
    error = json.loads(path.read_text())
    path.unlink()
    kind = {"SFTDataError": SFTDataError, "SFTModelError": SFTModelError}.get(error.get("type"), RuntimeError)
    raise kind(error.get("message", "training failed"))


def _wait_forwarding_sigterm(proc: subprocess.Popen) -> int:
    """Wait for the trainer; a SIGTERM to this process is passed on so the trainer checkpoints first."""
    if threading.current_thread() is not threading.main_thread():
        return proc.wait()  # signal handlers can only be installed from the main thread
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _repo_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def main(argv: list[str] | None = None) -> int:
    """``python -m tasks.sft.train <spec.json>``: run one training; exit 143 after a SIGTERM stop."""
    from tasks.sft.data import SFTDataError
    from tasks.sft.qlora import SFTModelError

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tasks.sft.train <spec.json>", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        train_sft(TrainSpec.load(Path(argv[0])))
    except SFTInterrupted as err:
        print(f"sft: {err}", file=sys.stderr)
        return EXIT_SIGTERM
    except (SFTDataError, SFTModelError) as err:
        print(f"sft: error: {err}", file=sys.stderr)
        # The launching process re-raises this as the same error type (see run_training).
        spec_dir = Path(argv[0]).parent
        atomic_write_text(spec_dir / ERROR_FILE, json.dumps({"type": type(err).__name__, "message": str(err)}))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
