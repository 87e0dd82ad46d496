"""The ``salr`` command line: ``salr demo`` (more subcommands arrive with the pipeline)."""

from __future__ import annotations

import argparse
import sys

SUBCOMMANDS = {
    "demo": "BM8x8 kernels on the packaged SmolLM2-135M weights: accuracy, memory, decode speed",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="salr", description="sparse + low-rank LLM fine-tuning and inference")
    parser.add_argument("command", choices=sorted(SUBCOMMANDS), help="; ".join(f"{k}: {v}" for k, v in SUBCOMMANDS.items()))
    args, rest = parser.parse_known_args(argv[:1])
    try:
        if args.command == "demo":
            from salr import demo
            return demo.main(argv[1:])
    except (FileNotFoundError, ImportError, ValueError) as exc:
        print(f"salr {args.command}: {exc}", file=sys.stderr)
        return 2
    return 1
