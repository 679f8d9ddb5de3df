"""Structured output: a constraint is compiled once in the gateway before any engine sees it.

Why: OpenVINO GenAI compiles the grammar (XGrammar) inside the shared continuous-batching step, and a
schema it cannot compile (e.g. ``minimum`` > ``maximum``) raises out of ``step()``, failing every
request in the batch. The same compiler, called here, turns that into a 400 naming the field. vLLM
compiles with XGrammar too, so what passes here is what its engine accepts.
"""

from __future__ import annotations

import functools
import re

from serving.backends.base import Constraint
from serving.errors import APIError


def check_constraint(constraint: Constraint | None, param: str) -> Constraint | None:
    """``constraint`` if XGrammar compiles it; else a 400 naming ``param`` with the compiler's reason."""
    if constraint is None:
        return None
    if constraint.kind in ("json_schema", "json_object"):
        kind, text = "json", constraint.json_schema_text()
    else:
        kind, text = "regex", constraint.as_regex()
    error = _compile_error(kind, text)
    if error:
        raise APIError(400, f"{param}: the {'JSON schema' if kind == 'json' else 'regex'} cannot be used for "
                            f"constrained decoding: {error}", param=param, code="invalid_structured_output")
    return constraint


@functools.lru_cache(maxsize=512)
def _compile_error(kind: str, text: str) -> str | None:
    try:
        import xgrammar
    except ImportError as err:  # pragma: no cover - installed by `make setup`
        raise APIError(501, "structured output needs xgrammar in the gateway's environment "
                            "(pip install --no-deps xgrammar apache-tvm-ffi; `make setup` does)",
                       code="structured_output_unavailable") from err
    try:
        if kind == "json":
            xgrammar.Grammar.from_json_schema(text)
        else:
            xgrammar.Grammar.from_regex(text)
    except (RuntimeError, ValueError) as err:
        # XGrammar's C++ errors start with a time and a source location: keep the message after them.
        first = (str(err).strip().splitlines() or [""])[0]
        return re.sub(r"^\[[^\]]*\]\s*\S+?:\d+:\s*", "", first)[:300] or type(err).__name__
    return None
