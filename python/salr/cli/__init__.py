"""The ``salr`` command line: :mod:`.parser` (arguments), :mod:`.commands` (what each subcommand
does), :mod:`.steps` (the model-level steps they share), :mod:`.demo`, :mod:`.runs` (run
directories: config, metrics, report, plots), :mod:`.assets` (the packaged SmolLM2 + Wikipedia) and
:mod:`.bench` (the kernel benchmark). ``salr`` and ``python -m salr`` call :func:`main`.
"""

from __future__ import annotations

import os
import sys

import torch

from salr.cli import commands
from salr.cli.parser import CRITERIA, METHODS, UserError, build_parser

__all__ = ["CRITERIA", "METHODS", "UserError", "build_parser", "main"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        handler = getattr(commands, f"cmd_{args.command}")
        return int(handler(args) or 0)
    except (UserError, ValueError, FileNotFoundError, ImportError) as exc:
        if os.environ.get("SALR_DEBUG"):
            raise  # SALR_DEBUG=1 shows the traceback of what was reported as a user error
        print(f"salr {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"salr {args.command}: interrupted (checkpoints, if any, are complete; --resume continues)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
