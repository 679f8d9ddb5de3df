"""lmforge serving gateway: OpenAI-compatible + JSON-RPC API, A/B split, hot swap (see serving/app.py)."""
