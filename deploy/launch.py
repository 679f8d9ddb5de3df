"""``python -m deploy.launch ROOT NAME``: exec stack program NAME with its secrets in its environment only."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from deploy.programs import StackSpec, program


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: python -m deploy.launch STACK_ROOT PROGRAM")
    spec = StackSpec.load(Path(argv[0]))
    args, env = program(spec, argv[1])
    os.execvpe(args[0], args, os.environ | env)


if __name__ == "__main__":
    main(sys.argv[1:])
