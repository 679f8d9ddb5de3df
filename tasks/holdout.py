"""The pipeline's ``evaluate`` stage: score the selected variant on the held-out test split.

The test split is never used for training or for choosing the variant, so these are the numbers
the registry version carries and the promotion gates compare.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from configs.schema import EvaluateConfig
from tasks.results import EvaluationResult


def evaluate_holdout(home: Path, ir_dir: Path, data_version: str, eval_cfg: EvaluateConfig) -> EvaluationResult:
    """Metrics of the IR at ``ir_dir`` on the test split of ``data_version``."""
    from tasks.data import load_curated
    from tasks.evaluate import evaluate_records
    from tasks.generators import OpenVINOGenerator

    test = list(load_curated(home, data_version)["test"])
    generate = OpenVINOGenerator.for_evaluation(ir_dir, eval_cfg)
    result = evaluate_records(test, generate, eval_cfg)
    return EvaluationResult(metrics=result.metrics, ir_dir=ir_dir, split="test")


@task(name="evaluate-selected")
def evaluate_holdout_task(home: Path, ir_dir: Path, data_version: str,
                          eval_cfg: EvaluateConfig) -> EvaluationResult:
    """Prefect wrapper of :func:`evaluate_holdout`."""
    return evaluate_holdout(home, ir_dir, data_version, eval_cfg)
