"""Selection policy, report rendering and atomic variant directories (pure functions, no model work)."""

from __future__ import annotations

import json

import pytest

from configs.schema import QuantizeConfig
from tasks.quantize.report import (
    certainly_worse,
    compare_to_reference,
    render_chart,
    render_markdown,
    select_variant,
)
from tasks.quantize.variants import finish_variant, is_complete, read_variant, staged_variant, sweep_stale

N = 300  # examples per task, as in the default preset's validation split


def _table(wrong_sentiment: int, missed_entities: int) -> list[dict]:
    """An evaluation table: sentiment examples 0..wrong-1 answered wrong; NER examples each with one gold
    entity, the first ``missed_entities`` of them not found."""
    rows = [{"id": f"s{i}", "task": "sentiment", "score": 0.0 if i < wrong_sentiment else 1.0} for i in range(N)]
    rows += [{"id": f"n{i}", "task": "ner", "matched": 0 if i < missed_entities else 1, "n_pred": 1, "n_gold": 1}
             for i in range(N)]
    return rows


def _row(tmp_path, name, ir_mb, table=None, tok8=100.0):
    row = {"variant": name, "ir_bytes": int(ir_mb * 1e6), "tok_s_1": tok8 / 4, "tok_s_8": tok8,
           "peak_rss_mb": 300.0, "latency_ms_p95": 50.0, "metrics": {}}
    if table is not None:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(table))
        sentiment = [r["score"] for r in table if r["task"] == "sentiment"]
        matched = sum(r["matched"] for r in table if r["task"] == "ner")
        row["metrics"] = {"sentiment_accuracy": sum(sentiment) / len(sentiment), "ner_f1": matched / N,
                          "format_compliance_sentiment": 1.0, "format_compliance_ner": 1.0}
        row["eval_table"] = str(path)
    return row


@pytest.fixture
def rows(tmp_path):
    return [
        _row(tmp_path, "fp32_ir", 540, _table(30, 90), tok8=200),
        _row(tmp_path, "int8", 136, _table(30, 90), tok8=430),   # the same answers
        _row(tmp_path, "int4", 90, _table(39, 90), tok8=500),    # 9 more sentiment errors of 300: -3 points
    ]


def test_the_smallest_variant_whose_drop_bound_is_within_one_point_wins(rows):
    choice = select_variant(rows, QuantizeConfig())
    assert choice["variant"] == "int8"
    int4 = choice["compare"]["int4"]["sentiment"]
    assert int4["difference"] == pytest.approx(-3.0) and int4["drop_upper"] > 3.0  # paired: never below the loss
    assert choice["compare"]["int8"]["ner"]["drop_upper"] == 0.0
    assert "int4" not in choice["eligible"] and {"fp32_ir", "int8"} <= set(choice["eligible"])
    assert "one-sided 95% upper bound" in choice["reason"]


def test_a_single_flipped_example_in_300_is_noise_not_a_failure(tmp_path, rows):
    rows[1] = _row(tmp_path, "int8", 136, _table(31, 90))  # 1 of 300 = 0.33 points, bound ~1 point
    compare = compare_to_reference(rows)["int8"]["sentiment"]
    assert compare["difference"] == pytest.approx(-1 / 3, abs=1e-3)
    assert 0.3 < compare["drop_upper"] <= 1.0
    assert select_variant(rows, QuantizeConfig())["variant"] == "int8"


def test_looser_threshold_admits_the_smaller_variant(rows):
    assert select_variant(rows, QuantizeConfig(max_metric_drop=6.0))["variant"] == "int4"


def test_fastest_policy(rows):
    assert select_variant(rows, QuantizeConfig(selection="fastest"))["variant"] == "int8"
    assert select_variant(rows, QuantizeConfig(selection="fastest", max_metric_drop=6.0))["variant"] == "int4"


def test_nothing_passes_falls_back_to_the_reference(tmp_path):
    rows = [_row(tmp_path, "fp32_ir", 540, _table(0, 0)), _row(tmp_path, "int8", 136, _table(60, 0)),
            _row(tmp_path, "int4", 90, _table(0, 120))]
    choice = select_variant(rows, QuantizeConfig())
    assert choice["variant"] == "fp32_ir" and choice["eligible"] == ["fp32_ir"]


def test_an_unscored_variant_is_not_eligible_when_the_reference_was_scored(tmp_path, rows):
    rows[2] = _row(tmp_path, "int4", 90)  # no evaluation table
    assert "int4" not in select_variant(rows, QuantizeConfig())["eligible"]


def test_without_metrics_no_gate_is_applied_and_says_so(tmp_path):
    rows = [_row(tmp_path, "fp32_ir", 540), _row(tmp_path, "int8", 136), _row(tmp_path, "int4", 90)]
    choice = select_variant(rows, QuantizeConfig())
    assert choice["variant"] == "int4" and "no quality gate" in choice["reason"]


def test_selection_requires_the_reference_row(tmp_path):
    with pytest.raises(ValueError, match="fp32_ir"):
        select_variant([_row(tmp_path, "int8", 136)], QuantizeConfig())


def test_markdown_and_chart_show_intervals(tmp_path, rows):
    cfg = QuantizeConfig()
    rows = [*rows, {"variant": "merged_hf", "dir_bytes": 270_000_000, "metrics": {}}]
    choice = select_variant(rows, cfg)
    choice["compare"]["int8"]["ner"]["drop_upper"] = -0.02  # better even at the bound: printed 0.0, not -0.0
    text = render_markdown(rows, choice, cfg, notes=["the base is dequantised from a Q4_1 GGUF"])
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| variant | IR MB"))
    assert "tok/s @1" in header and "tok/s @8" in header and "P95 ms" in header
    int8 = next(line for line in lines if line.startswith("| int8 **(selected)** |"))
    assert "| 136.0 | 25.2% |" in int8
    int4 = [line for line in lines if line.startswith("| int4 |")][-1]  # the metrics table's row
    assert "0.870 (-3.0 [" in int4 and "drop <=" in int4
    int8_metrics = [line for line in lines if line.startswith("| int8 ")][-1]
    assert "drop <= 0.0;" in int8_metrics and "-0.0;" not in int8_metrics
    assert "| merged_hf | 270.0 | - |" in text and "- the base is dequantised from a Q4_1 GGUF" in text
    png = render_chart(rows, cfg, tmp_path / "report.png", choice["compare"])
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 5000
    assert not list(tmp_path.glob(".tmp-*"))


def test_screening_stops_only_a_variant_certain_to_lose_more_than_the_limit(tmp_path, rows):
    reference, int8, int4 = (rows[0]["eval_table"], rows[1]["eval_table"], rows[2]["eval_table"])
    assert certainly_worse(reference, int8, 1.0) is None            # same answers: may pass
    reason = certainly_worse(reference, int4, 1.0)                  # -3 points, bound well above 1
    assert reason and reason.startswith("sentiment") and "300 examples" in reason
    assert certainly_worse(reference, int4, 5.0) is None            # inside a looser limit: keep scoring
    one_off = tmp_path / "one_off.json"
    one_off.write_text(json.dumps(_table(31, 90)))                  # one flip in 300: uncertain, not screened
    assert certainly_worse(reference, one_off, 0.1) is None


def test_a_screened_out_variant_is_marked_in_the_report(tmp_path, rows):
    rows[2]["screened_out"] = "sentiment: drop >= 1.7 points at 95% confidence on 300 examples (limit 1)"
    choice = select_variant(rows, QuantizeConfig())
    markdown = render_markdown(rows, choice, QuantizeConfig())
    assert "int4 (screened out)" in markdown and "n 300" in markdown


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


def test_an_ir_without_a_logits_output_keeps_its_files(tmp_path):
    """Nothing to trace: group_quantize_logits_weight leaves the IR as NNCF wrote it and says so with None."""
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops

    from tasks.quantize.export import group_quantize_logits_weight, logits_weight_nodes

    x = ops.parameter([1, 8], np.float32, name="x")
    y = ops.matmul(x, ops.constant(np.ones((8, 4), dtype=np.float32)), False, False)
    y.output(0).set_names({"out"})
    ov.save_model(ov.Model([y], [x], "plain"), str(tmp_path / "openvino_model.xml"), compress_to_fp16=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert logits_weight_nodes(tmp_path) == []
    assert group_quantize_logits_weight(tmp_path, 64) is None
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_report_says_what_qat_recovered_or_why_it_did_not_run(tmp_path, rows):
    from tasks.quantize.steps import ExportPlan, report_notes

    plan = ExportPlan(export_id="x", root=tmp_path, base_dir=tmp_path, adapter_dir=tmp_path, adapter_sha256="",
                      inputs_sha256="", variants=())
    without_qat = report_notes(rows, select_variant(rows, QuantizeConfig()), None, plan)
    (why,) = [n for n in without_qat if "QAT" in n]
    assert why.startswith("QAT not run") and "`int8` loses, in points" in why and "sentiment 0.0" in why
    assert "650-771 s" in why  # the time QAT took where it was measured

    qat = _row(tmp_path, "qat_int4", 90, _table(33, 90))  # 6 of int4's 9 extra sentiment errors won back
    with_qat = report_notes([*rows, qat], select_variant([*rows, qat], QuantizeConfig()), None, plan)
    (recovered,) = [n for n in with_qat if "QAT" in n]
    assert recovered.startswith("QAT `qat_int4`") and "sentiment: PTQ loses +3.0 pts, QAT +1.0 pts (67% recovered)" \
        in recovered
