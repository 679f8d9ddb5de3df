"""Selection policy, report rendering and atomic variant directories (pure functions, no model work)."""

from __future__ import annotations

import pytest

from configs.schema import QuantizeConfig
from tasks.quantize.report import metric_drops, render_chart, render_markdown, select_variant
from tasks.quantize.variants import finish_variant, is_complete, read_variant, staged_variant, sweep_stale


def _row(name, ir_mb, acc=None, f1=None, tok8=100.0):
    metrics = {k: v for k, v in {"sentiment_accuracy": acc, "ner_f1": f1}.items() if v is not None}
    return {"variant": name, "ir_bytes": int(ir_mb * 1e6), "tok_s_1": tok8 / 4, "tok_s_8": tok8,
            "peak_rss_mb": 300.0, "model_rss_mb": 200.0, "metrics": metrics}


ROWS = [
    _row("fp32_ir", 540, acc=0.900, f1=0.700, tok8=200),
    _row("int8", 136, acc=0.895, f1=0.698, tok8=430),
    _row("int4", 90, acc=0.870, f1=0.690, tok8=500),   # 3 points of accuracy lost
    _row("qat_int4", 91, acc=0.905, f1=0.695, tok8=495),
]


def test_smallest_within_one_point_wins():
    choice = select_variant(ROWS, QuantizeConfig())
    assert choice["variant"] == "qat_int4"  # int4 is smaller but lost 3 points
    assert choice["drops"]["int4"]["sentiment_accuracy"] == pytest.approx(3.0)
    assert "int4" not in choice["eligible"] and "fp32_ir" in choice["eligible"]
    assert "sentiment_accuracy" in choice["reason"] and "ner_f1" in choice["reason"]


def test_looser_gate_admits_the_smaller_variant():
    assert select_variant(ROWS, QuantizeConfig(max_metric_drop=3.5))["variant"] == "int4"


def test_fastest_policy():
    assert select_variant(ROWS, QuantizeConfig(selection="fastest"))["variant"] == "qat_int4"
    assert select_variant(ROWS, QuantizeConfig(selection="fastest", max_metric_drop=5))["variant"] == "int4"


def test_nothing_passes_falls_back_to_the_reference():
    rows = [_row("fp32_ir", 540, acc=0.9), _row("int8", 136, acc=0.7), _row("int4", 90, acc=0.6)]
    assert select_variant(rows, QuantizeConfig())["variant"] == "fp32_ir"


def test_without_metrics_no_gate_is_applied_and_says_so():
    rows = [_row("fp32_ir", 540), _row("int8", 136), _row("int4", 90)]
    choice = select_variant(rows, QuantizeConfig())
    assert choice["variant"] == "int4" and "no quality gate" in choice["reason"]


def test_only_configured_metrics_gate():
    rows = [_row("fp32_ir", 540, acc=0.9, f1=0.9), _row("int4", 90, acc=0.9, f1=0.5)]
    assert select_variant(rows, QuantizeConfig())["variant"] == "fp32_ir"
    assert select_variant(rows, QuantizeConfig(selection_metrics=["sentiment_accuracy"]))["variant"] == "int4"
    assert metric_drops(rows[1], rows[0], ["ner_f1", "missing"]) == {"ner_f1": pytest.approx(40.0)}


def test_selection_requires_the_reference_row():
    with pytest.raises(ValueError, match="fp32_ir"):
        select_variant([_row("int8", 136)], QuantizeConfig())


def test_markdown_and_chart(tmp_path):
    cfg = QuantizeConfig()
    rows = [*ROWS, {"variant": "merged_hf", "dir_bytes": 270_000_000, "metrics": {}}]
    choice = select_variant(rows, cfg)
    text = render_markdown(rows, choice, cfg)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| variant"))
    assert "tok/s @1" in header and "tok/s @8" in header and "sentiment_accuracy" in header
    int8 = next(line for line in lines if line.startswith("| int8 "))
    assert "| 136.0 | 25.2% |" in int8 and "0.895" in int8
    assert "| qat_int4 **(selected)** |" in text and "| merged_hf | 270.0 | - |" in text
    assert "int4: ner_f1 -1.0, sentiment_accuracy -3.0" in text
    assert "qat_int4: ner_f1 -0.5, sentiment_accuracy +0.5" in text
    png = render_chart(rows, cfg, tmp_path / "report.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert not list(tmp_path.glob(".tmp-*"))


def test_staged_variant_failure_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with staged_variant(tmp_path, "int8") as staging:
            (staging / "openvino_model.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_staged_variant_without_metadata_is_not_published(tmp_path):
    with pytest.raises(RuntimeError, match="without variant.json"):
        with staged_variant(tmp_path, "int8") as staging:
            (staging / "openvino_model.bin").write_bytes(b"all of it")
    assert not (tmp_path / "int8").exists()


def test_staged_variant_replaces_an_old_one_whole(tmp_path):
    for content in (b"old", b"new"):
        with staged_variant(tmp_path, "int8") as staging:
            (staging / "openvino_model.bin").write_bytes(content)
            finish_variant(staging, "int8", "sha-" + content.decode())
    assert (tmp_path / "int8" / "openvino_model.bin").read_bytes() == b"new"
    assert is_complete(tmp_path / "int8", "sha-new") and not is_complete(tmp_path / "int8", "sha-old")
    assert read_variant(tmp_path / "int8")["files"] == {"openvino_model.bin": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
    assert (tmp_path / "int8").stat().st_mode & 0o055 == 0o055  # group/others may read and enter


def test_sweep_removes_leftovers_only(tmp_path):
    (tmp_path / ".tmp-int4-abc").mkdir()
    (tmp_path / ".tmp-int4-abc" / "openvino_model.bin").write_bytes(b"partial")
    (tmp_path / "int8").mkdir()
    assert sweep_stale(tmp_path) == [".tmp-int4-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]
