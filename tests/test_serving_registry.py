"""The gateway's registry client: each backend gets the artifact registered for it, and variants that
load at the same time (champion and challenger at startup) do not trip over each other's imports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from configs.schema import PromotionGates, RegistryConfig
from serving.registry import ModelResolveError, resolve_model_dir
from tasks.registry import gate_version, register_version
from tasks.tracking import use_mlflow
from tests.conftest import REPO

METRICS = {"sentiment_accuracy": 0.9, "format_compliance_sentiment": 1.0, "format_compliance_ner": 1.0}
LINEAGE = {"data_version": "d1", "code_commit": "c1"}


@pytest.fixture()
def registered(tmp_path, mlflow_uri, tiny_ir_dir, tiny_model_dir):
    """A version registered the way the pipeline does it: the selected IR (its directory, like every
    IR, holds a config.json and sorts before merged_hf) plus the merged HF weights."""
    use_mlflow(mlflow_uri, "serving-registry", tmp_path / "artifacts")
    registry = RegistryConfig(model_name="lmforge-resolve", gates=PromotionGates(min_format_compliance=0.5))
    ir, merged = tmp_path / "export" / "fp32_ir", tmp_path / "export" / "merged_hf"
    shutil.copytree(tiny_ir_dir, ir)
    shutil.copytree(tiny_model_dir, merged)
    version = register_version(registry, {"openvino": ir, "merged_hf": merged}, METRICS, LINEAGE)
    gate_version(registry, version.version)
    return {"registry": registry, "uri": mlflow_uri, "version": version.version, "ir": ir}


@pytest.mark.parametrize(("backend", "artifact", "marker"), [
    ("vllm", "merged_hf", "model.safetensors"), ("hf", "merged_hf", "model.safetensors"),
    ("openvino", "fp32_ir", "openvino_model.xml"),
])
def test_an_alias_resolves_to_the_artifact_its_backend_serves(registered, tmp_path, backend, artifact, marker):
    uri = "models:/lmforge-resolve@champion"
    path, version = resolve_model_dir(uri, registered["uri"], tmp_path / "cache", backend)
    assert version == registered["version"]
    assert path.name == artifact and (path / marker).is_file()
    if backend != "openvino":
        assert not (path / "openvino_model.xml").exists(), "vLLM/HF must not get an OpenVINO IR directory"


def test_a_version_without_merged_weights_says_so_for_vllm(registered, tmp_path):
    only_ir = register_version(registered["registry"], {"openvino": registered["ir"]}, METRICS, LINEAGE)
    with pytest.raises(ModelResolveError, match=r"has no 'merged_hf' artifact \(it has: openvino\).*vllm backend"):
        resolve_model_dir(f"models:/lmforge-resolve/{only_ir.version}", registered["uri"], tmp_path / "cache", "vllm")


def test_a_local_export_dir_gives_vllm_the_hf_weights_not_an_ir(registered):
    path, version = resolve_model_dir(str(registered["ir"].parent), backend="vllm")
    assert version is None and path.name == "merged_hf"


def test_variants_loading_at_once_import_transformers_safely(tiny_model_dir):
    """Two HF variants load in parallel threads in a fresh interpreter (transformers not imported yet).
    Unguarded, the second thread fails with "cannot import name 'AutoModelForCausalLM' from 'transformers'"."""
    script = textwrap.dedent(f"""
        import asyncio, json
        from configs.schema import ServeConfig
        from serving.engine import VariantPool
        from serving.metrics import Metrics

        variants = [{{"name": n, "model_uri": {str(tiny_model_dir)!r}}} for n in ("champion", "challenger")]
        pool = VariantPool(ServeConfig(backend="hf", watch=False, auth=False, variants=variants), "hf", Metrics())

        async def main():
            results = await asyncio.gather(*(pool.load(n) for n in pool.slots), return_exceptions=True)
            print(json.dumps([repr(r) for r in results if isinstance(r, BaseException)]))
            await pool.close()

        asyncio.run(main())
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for _ in range(3):  # the race hit every time on this machine; three fresh interpreters to be sure
        done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.strip().splitlines()[-1]) == []
