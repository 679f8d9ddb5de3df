"""``lmforge serve``, ``keys`` and ``ab``: the gateway, its API keys and its A/B report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli import ConfigOption, Overrides, app, console, err_console, fail, load_or_exit


@app.command("serve")
def serve_cmd(
    config: ConfigOption = None,
    overrides: Overrides = None,
    backend: Annotated[
        str | None, typer.Option("--backend", help="openvino, vllm or hf (default: serve.backend).")
    ] = None,
) -> None:
    """Run the serving gateway (OpenAI API, JSON-RPC, A/B split, hot swap) until SIGTERM.

    Variants come from serve.variants (registry aliases or local IR dirs); keys from `lmforge keys`.
    """
    from serving.app import serve

    cfg = load_or_exit(config, overrides)
    if backend not in (None, "openvino", "vllm", "hf"):
        fail(f"unknown backend {backend!r}: use openvino, vllm or hf", code=2)
    err_console.print(f"gateway on http://{cfg.serve.host}:{cfg.serve.port}  variants: "
                      + ", ".join(f"{v.name}={v.model_uri} ({v.weight:g})" for v in cfg.serve.variants))
    serve(cfg.serve, cfg.home, cfg.tracking_uri(), cfg.data.templates, backend)


@app.command("keys")
def keys_cmd(
    action: Annotated[str, typer.Argument(help="add | revoke | list")],
    target: Annotated[str | None, typer.Argument(help="add: key name; revoke: key id or name.")] = None,
    config: ConfigOption = None,
    priority: Annotated[str, typer.Option(help="Priority class of a new key (serve.priority_shares).")] = "normal",
    rate: Annotated[int | None, typer.Option(help="Requests per minute for a new key (default: serve config).")] = None,
    burst: Annotated[int | None, typer.Option(help="Bucket size for a new key (default: serve config).")] = None,
    admin: Annotated[bool, typer.Option(help="May use the /admin API.")] = False,
) -> None:
    """Manage gateway API keys (stored hashed in <home>/serving/keys.sqlite, or LMFORGE_DATABASE_URL's database).

    lmforge keys add alice [--priority high] [--rate 120] [--admin]; lmforge keys revoke <id|name>; lmforge keys list
    """
    import time

    from serving.auth import KeyStore
    from serving.db import state_locations

    cfg = load_or_exit(config, None)
    store = KeyStore(state_locations(cfg.serve.database_url, cfg.home)[0])
    if action == "add":
        if not target:
            fail("keys add needs a name: lmforge keys add <name>", code=2)
        if priority not in cfg.serve.priority_shares:
            fail(f"unknown priority {priority!r}; classes: {', '.join(cfg.serve.priority_shares)}", code=2)
        key, record = store.add(target, priority=priority, rate_per_minute=rate, burst=burst, admin=admin)
        err_console.print(f"key {record.key_id} ({record.name}, {record.priority}); shown once, store it now:")
        console.print(key, highlight=False)
    elif action == "revoke":
        if not target:
            fail("keys revoke needs a key id or name", code=2)
        count = store.revoke(target)
        if not count:
            fail(f"no active key with id or name {target!r}")
        console.print(f"revoked {count} key(s)")
    elif action == "list":
        table = Table("id", "name", "priority", "rate/min", "burst", "admin", "created", "revoked")
        for k in store.list():
            stamp = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""  # noqa: E731
            table.add_row(k.key_id, k.name, k.priority, str(k.rate_per_minute or cfg.serve.rate_limit_per_minute),
                          str(k.burst or cfg.serve.rate_limit_burst), "yes" if k.admin else "", stamp(k.created_at),
                          stamp(k.revoked_at))
        console.print(table)
    else:
        fail(f"unknown action {action!r}: use add, revoke or list", code=2)


@app.command("ab")
def ab_cmd(
    action: Annotated[str, typer.Argument(help="report")],
    config: ConfigOption = None,
    reference: Annotated[str | None, typer.Option(help="Variant to compare against (default: most traffic).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON only.")] = False,
) -> None:
    """Per-variant outcomes from gateway feedback, with significance tests (`lmforge ab report`).

    Success = feedback score > 0. Each variant is compared with the reference by a two-proportion
    z-test (Fisher's exact test when a cell has < 5), plus Mann-Whitney U on the raw scores.
    """
    from serving.db import state_locations
    from serving.feedback import ab_report

    if action != "report":
        fail(f"unknown action {action!r}: use report", code=2)
    cfg = load_or_exit(config, None)
    db = state_locations(cfg.serve.database_url, cfg.home)[1]
    if not cfg.serve.database_url and not Path(db).is_file():
        fail(f"no feedback database at {db}: serve traffic and POST /v1/feedback first")
    report = ab_report(db, reference)
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table("variant", "requests", "feedback", "success rate", "mean score", title="A/B outcomes")
    for row in report["variants"]:
        rate = "" if row["success_rate"] is None else f"{row['success_rate']:.1%}"
        mean = "" if row["mean_score"] is None else f"{row['mean_score']:.3f}"
        table.add_row(row["variant"], str(row["requests"]), str(row["feedback"]), rate, mean)
    console.print(table)
    for test in report["tests"]:
        if test["p_value"] is None:
            console.print(f"{test['variant']} vs {test['against']}: {test.get('note', 'not enough data')}")
            continue
        verdict = "significant" if test["significant"] else "not significant"
        console.print(f"{test['variant']} vs {test['against']}: difference {test['difference']:+.1%}, "
                      f"{test['test']} p={test['p_value']:.4f} ({verdict} at 0.05)"
                      + (f", Mann-Whitney p={test['mann_whitney_p']:.4f}"
                         if test["mann_whitney_p"] is not None else ""))
