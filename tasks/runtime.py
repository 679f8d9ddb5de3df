"""Process-level settings the training and evaluation stages share."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def torch_device(choice: str) -> str:
    """The torch device a config asks for: ``cpu``; ``gpu``/``cuda`` = this process's GPU
    (``cuda:<LOCAL_RANK>``, so each DDP rank gets its own); ``auto`` = a GPU when torch sees one."""
    if choice == "cpu":
        return "cpu"
    if choice == "auto":
        import torch

        if not torch.cuda.is_available():
            return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads (None = leave as is), restoring the count after."""
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
