"""The data card: what went in, what came out, what was dropped and why; plus a length histogram."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task

from configs.data_schema import TASKS
from tasks.files import atomic_save_figure

SPLITS = ("train", "validation", "test")


def length_summary(values: list[int]) -> dict[str, float]:
    """min / mean / median / p95 / max of a list of lengths (zeros when empty)."""
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    ordered = sorted(values)

    def pick(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {"min": ordered[0], "mean": round(sum(ordered) / len(ordered), 1), "p50": pick(0.5),
            "p95": pick(0.95), "max": ordered[-1]}


def render_markdown(card: dict[str, Any]) -> str:
    """The card as Markdown (Prefect artifact, MLflow artifact, ``lmforge curate`` output)."""
    counts = card["counts"]
    lines = [
        f"# Data card `{card['version']}`",
        "",
        f"{card['total']} examples ({', '.join(f'{s} ' + str(counts[s]['total']) for s in SPLITS)}) "
        f"from {len(card['sources'])} sources; seed {card['seed']}; built in {card['seconds']} s.",
        "",
        "## Examples per task and split",
        "",
        "| task | train | validation | test | tokens p50 / p95 / max |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in TASKS:
        tokens = card["tokens"].get(name, length_summary([]))
        lines.append(f"| {name} | {counts['train'].get(name, 0)} | {counts['validation'].get(name, 0)} | "
                     f"{counts['test'].get(name, 0)} | {tokens['p50']} / {tokens['p95']} / {tokens['max']} |")
    lines += [
        "",
        "## Sources",
        "",
        "| source | task | role | rows read | quarantined | cleaned ok | train taken / quota | sha256 |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name, s in card["sources"].items():
        lines.append(f"| {name} | {s['task']} | {s['split']} | {s['read']} | {s['quarantined']} | {s['cleaned']} | "
                     f"{s['train_taken']} / {s['train_quota']} | `{s['sha256'][:12]}` |")
    lines += ["", "## Cleaning rules", "", "| rule | substitutions | records changed |", "|---|---:|---:|"]
    for name, hits in card["rules"].items():
        lines.append(f"| {name} | {hits['hits']} | {hits['records']} |")
    dedup = card["dedup"]
    lines += [
        "",
        "## Duplicates removed",
        "",
        f"Exact: {dedup['exact_within']} within a split, {dedup['exact_cross']} across splits. "
        f"Near (Jaccard >= {dedup['threshold']}): {dedup['near_within']} within a split, "
        f"{dedup['near_cross']} across splits. Evaluation examples are kept over training ones.",
        "",
        "## Quarantine",
        "",
    ]
    if card["quarantine"]:
        lines += ["| source | stage | kind | rows |", "|---|---|---|---:|"]
        for row in card["quarantine"]:
            lines.append(f"| {row['source']} | {row['stage']} | {row['kind']} | {row['count']} |")
    else:
        lines.append("Nothing quarantined.")
    lines += ["", "Token lengths (prompt + completion) per task: `lengths.png`.", ""]
    return "\n".join(lines)


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> Path:
    """Histogram of token lengths per task, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and in tests
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    present = [t for t in TASKS if lengths.get(t)]
    top = max((max(lengths[t]) for t in present), default=1)
    bins = [i * max(1, top // 40 + 1) for i in range(42)]
    for name in present:
        ax.hist(lengths[name], bins=bins, alpha=0.6, label=f"{name} (n={len(lengths[name])})")
    ax.set_xlabel("tokens (prompt + completion)")
    ax.set_ylabel("examples")
    ax.set_title("Curated example lengths")
    if present:
        ax.legend()
    fig.tight_layout()
    return atomic_save_figure(fig, path)


@task(name="publish-data-card")
def publish_card_task(version: str, card_md: str) -> str:
    """Prefect wrapper: publish the card as a markdown artifact keyed ``data-card``."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=card_md, key="data-card", description=f"lmforge data version {version}")
    return version
