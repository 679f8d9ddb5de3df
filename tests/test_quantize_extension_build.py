"""NNCF's C++ extension build: a killed build's lock must not hang every later QAT run."""

from __future__ import annotations

import os
import time

from tasks.quantize.qat import STALE_BUILD_S, prepare_nncf_extension_build


def _build_dir(root, name, age_s):
    build = root / "nncf" / name / "2.13.0+cpu"
    build.mkdir(parents=True)
    for file in ("lock", "build.ninja"):
        (build / file).write_text("")
        stamp = time.time() - age_s
        os.utime(build / file, (stamp, stamp))
    return build


def test_a_stale_lock_is_removed_and_a_live_build_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("NNCF_EXTENSION_LOAD_TIMEOUT", raising=False)
    stale = _build_dir(tmp_path, "quantized_functions_cpu", STALE_BUILD_S + 60)
    live = _build_dir(tmp_path, "other", 5)
    prepare_nncf_extension_build()
    assert not (stale / "lock").exists() and (stale / "build.ninja").exists()
    assert (live / "lock").exists()
    assert int(os.environ["NNCF_EXTENSION_LOAD_TIMEOUT"]) > 60  # NNCF's 60 s default failed builds here


def test_each_torch_path_gets_its_own_build_root(monkeypatch):
    # Worktrees symlinking one venv at different paths write different include paths into build.ninja:
    # sharing one build directory made each run rebuild the extension and overwrite the other's.
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")  # unset for the code under test; restored afterwards
    prepare_nncf_extension_build()
    first = os.environ["TORCH_EXTENSIONS_DIR"]
    assert "lmforge-" in first
    monkeypatch.setattr("torch.__file__", "/elsewhere/site-packages/torch/__init__.py")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "")
    prepare_nncf_extension_build()
    assert os.environ["TORCH_EXTENSIONS_DIR"] != first
