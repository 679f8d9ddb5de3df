"""Shared pieces of the serving tests: the tiny model as OpenVINO IR, a LoRA for it, a live gateway."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx


def tiny_ir(session_home: Path, tiny_model_dir: Path) -> Path:
    """The tiny model exported to OpenVINO IR with tokenizer/detokenizer IR, once per session.

    Several test modules call this; the directory under the session home is the cache.
    """
    from tasks.quantize.export import export_ir

    target = Path(session_home) / "serving-ir" / "tiny"
    if (target / "openvino_detokenizer.xml").is_file():
        return target
    staging = target.with_name(".tiny-staging")
    shutil.rmtree(staging, ignore_errors=True)
    export_ir(tiny_model_dir, staging)
    staging.rename(target)
    return target


def tiny_lora(tiny_model_dir: Path, out_file: Path, seed: int = 1, scale: float = 5.0) -> Path:
    """A random (non-zero) LoRA for the tiny model in the safetensors layout openvino_genai reads."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                                  init_lora_weights=False))
    tensors = {k.replace(".default", ""): v.detach().float() * scale
               for k, v in peft_model.state_dict().items() if "lora_" in k}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_file))
    return out_file


def register_versions(tracking_uri: str, ir_dir: Path, artifacts: Path, count: int = 2,
                      gate_status: str | None = "passed", name: str = "lmforge-assistant") -> list[str]:
    """Register ``ir_dir`` ``count`` times as versions of ``name`` in a real MLflow registry, the way the
    pipeline does (tasks.registry: a pyfunc model whose MLmodel names the IR under the ``openvino``
    artifact key, which the gateway resolves by), each its own run so each downloads to its own
    directory; tagged with ``gate_status`` unless None (never gated)."""
    from mlflow import MlflowClient

    from configs.schema import GATE_STATUS_TAG, RegistryConfig
    from tasks.registry import register_version
    from tasks.tracking import use_mlflow

    use_mlflow(tracking_uri, "serving-test", artifacts)
    client = MlflowClient(tracking_uri, tracking_uri)
    versions = []
    for _ in range(count):
        version = register_version(RegistryConfig(model_name=name), {"openvino": ir_dir}, {},
                                   {"code_commit": "test"}).version
        if gate_status is not None:
            client.set_model_version_tag(name, version, GATE_STATUS_TAG, gate_status)
        versions.append(version)
    return versions


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_gateway(app, ready_timeout: float = 180.0, require_ready: bool = True,
                    send_buffer: int | None = None) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port; yields the base URL.

    ``send_buffer``: SO_SNDBUF of the listening socket (accepted connections inherit it), so a client
    that stops reading blocks the server's writes after little data.
    """
    import uvicorn

    sockets = []
    if send_buffer:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
        sock.bind(("127.0.0.1", 0))
        sockets.append(sock)
        port = sock.getsockname()[1]
    else:
        port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": sockets or None}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + ready_timeout
    try:
        while time.monotonic() < deadline:
            if server.started:
                status = httpx.get(f"{base}/health/ready", timeout=5).status_code
                if status == 200 or not require_ready:
                    break
            if not thread.is_alive():
                raise RuntimeError("gateway thread died during startup")
            time.sleep(0.05)
        else:
            raise TimeoutError("gateway did not become ready")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy; return that or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError("condition not met in time")


def taught_model(tiny_model_dir: Path, out_dir: Path, messages: list[dict[str, str]], answer: str,
                 steps: int = 60) -> Path:
    """A copy of the tiny model taught one greedy answer to one chat (a few seconds of full fine-tuning on
    that example), for tests that need a model which finishes a structured answer: a random one never
    closes its JSON."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    shutil.copytree(tiny_model_dir, out_dir, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(out_dir))
    model = AutoModelForCausalLM.from_pretrained(str(out_dir))
    prompt = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False)["input_ids"]
    target = tokenizer(answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
    ids, labels = torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target])
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        model(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(str(out_dir))
    return out_dir
