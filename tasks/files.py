"""File helpers every stage shares: content hashes and writes that readers never see half done."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from pathlib import Path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_dir(path: Path, names: list[str] | None = None, skip_parts: tuple[str, ...] = ()) -> str:
    """Hash of a directory's files (relative names + contents), in name order.

    Args:
        path: the directory.
        names: only these relative names (missing ones are left out); None = every file below.
        skip_parts: leave out files with one of these names in their relative path (e.g. ``.cache``).
    """
    path = Path(path)
    files = [path / n for n in names] if names else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        relative = file.relative_to(path)
        if file.is_file() and not set(relative.parts) & set(skip_parts):
            digest.update(str(relative).encode())
            digest.update(sha256_file(file).encode())
    return digest.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temp file beside it and one ``os.replace``.

    Readers see the old content or the new one, never a partial file. Missing parent directories
    are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # pid and thread in the name: concurrent writers of the same path never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save_figure(fig, path: Path, **savefig_kwargs) -> Path:
    """Save a matplotlib figure as PNG through a temp file and one ``os.replace``, then close it.

    No version stamp in the PNG metadata: the same plot gives the same bytes."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    fig.savefig(tmp, format="png", metadata={"Software": None}, **savefig_kwargs)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def read_pointer(path: Path) -> str | None:
    """The name a pointer file (``LATEST``) holds, or None when it is missing or empty."""
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def write_pointer(path: Path, name: str) -> None:
    """Point the pointer file ``path`` at ``name``; readers see the old name or the new one."""
    atomic_write_text(path, name + "\n")


def swap_into_place(staging: Path, target: Path, retired_prefix: str = ".old-") -> None:
    """Replace the directory ``target`` with the fully written ``staging`` directory.

    The new directory appears under ``target`` in one rename, so readers see the old one or the
    new one, never a mix. The old one is renamed aside first and deleted after.

    Args:
        staging: the finished directory, on the same file system as ``target``.
        target: where it goes; need not exist.
        retired_prefix: name prefix of the old directory while it is set aside (a leftover
            sweep can match it).
    """
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.replace(staging, target)
        return
    retired = target.with_name(f"{retired_prefix}{target.name}-{os.getpid()}")
    shutil.rmtree(retired, ignore_errors=True)  # a leftover of an earlier process with the same pid
    os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
