"""Reads the `-Xptxas -v` lines of a CUDA build log: one row per (kernel, arch) with registers,
shared memory, stack and spill bytes. Writes a markdown table and fails on any spill.

    python scripts/ptxas_report.py BUILD_LOG OUTPUT.md
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '(\S+)' for '(sm_\w+)'")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USAGE = re.compile(r"ptxas info\s*: Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names through c++filt when it is there (the raw names otherwise)."""
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def parse(log: str) -> list[dict]:
    rows, current = [], None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2), "registers": None, "smem": 0, "stack": 0,
                       "spill_stores": 0, "spill_loads": 0}
            rows.append(current)
        elif current is not None and (m := FRAME.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := USAGE.search(line)):
            current["registers"] = int(m.group(1))
            current["smem"] = int(m.group(2) or 0)
    return rows


def main() -> int:
    log_path, out_path = sys.argv[1], sys.argv[2]
    rows = parse(open(log_path, encoding="utf-8", errors="replace").read())
    if not rows:
        print(f"ptxas_report: no ptxas -v lines in {log_path} (built without SALR_PTXAS_VERBOSE, or cached?)",
              file=sys.stderr)
        return 1
    names = demangle([r["kernel"] for r in rows])
    lines = ["| kernel | arch | registers | static smem (B) | stack (B) | spill stores (B) | spill loads (B) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    seen = set()
    for row, name in zip(rows, names):
        key = (name, row["arch"])
        if key in seen:  # a kernel compiled in two translation units reports twice
            continue
        seen.add(key)
        short = name.replace("(anonymous namespace)::", "").replace("salr::cuda::", "").split("(")[0]
        short = short.removeprefix("void ")
        lines.append(f"| `{short}` | {row['arch']} | {row['registers']} | {row['smem']} | {row['stack']} | "
                     f"{row['spill_stores']} | {row['spill_loads']} |")
    open(out_path, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    spilled = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spilled:
        print(f"ptxas_report: {len(spilled)} kernel(s) spill registers: "
              + ", ".join(f"{r['kernel']} ({r['arch']})" for r in spilled), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
