#!/usr/bin/env python3
"""The static instruction-budget gate of the CUDA kernels (no GPU needed); scripts/cuda_budget.sh runs it.

    python scripts/cuda_budget.py [--out TABLE.md] [--archs sm_90a,sm_80] [--jobs 2]

1. reads the markers beside each budgeted kernel's main loop (any file under cuda/):
       // SALR_BUDGET kernel=<regex on the mangled name> tiles_per_iter=<N> tile=<16x16|16x32>
       //             bytes_per_tile=<B> max_per_tile=<limit> [threads=<block size, default 128>]
       //             [gate=report]
   (one line in the source); gate=report lists a kernel for comparison without gating it;
2. compiles every cuda/budget/*.cu (a translation unit that includes a kernel header without torch
   headers and instantiates its kernels) per architecture with nvcc -Xptxas -v into a host
   executable, runs it (host only: a TU may print `SALR_BUDGET_SMEM <regex> <bytes>` for dynamic
   shared memory) and disassembles it with cuobjdump -sass;
3. per marked kernel: the loops are the ranges closed by backward branches; the main loop is the
   smallest one holding the most tensor-core instructions; one iteration = every instruction in its
   range once (a nested loop's body counted once, and reported); per tile = that / tiles_per_iter;
4. prints the table (per tile, registers, shared memory, stack, spills, local memory, occupancy,
   the issue budget of an H100 and an H200 at 90% of HBM bandwidth) and exits 1 when on sm_90a a
   kernel is above its max_per_tile, or on any arch has a spill, a stack frame, local memory
   (LDL/STL) or a forward branch inside its main loop, or when a marker matches no kernel.
Stands alone (the method of ../shared/tools/sass_budget.py, re-implemented).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"//\s*SALR_BUDGET\s+(.*)$")
MMA = re.compile(r"^(HMMA|HGMMA|IMMA|IGMMA|QGMMA|BGMMA|DMMA)")
INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[0-9T]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
BRANCH_TARGET = re.compile(r"(?:0x)?([0-9a-f]+)\s*$")
# (SMs, schedulers/SM, sustained GHz, HBM TB/s)
GPUS = {"H100": (132, 4, 1.755, 3.35), "H200": (132, 4, 1.755, 4.80)}
ARCH_LIMITS = {  # shared memory per SM / per block (bytes), registers per SM, warps per SM, blocks per SM
    "sm_90a": (233472, 232448, 65536, 64, 32),
    "sm_80": (167936, 166912, 65536, 64, 32),
}


def fail(msg: str) -> None:
    sys.exit(f"cuda_budget: {msg}")


def find_tool(name: str) -> str:
    candidates = [os.environ.get(name.upper()), shutil.which(name),
                  os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    candidates += glob.glob(os.path.join(ROOT, ".venv", "lib", "python3*", "site-packages", "nvidia", "cu*", "bin", name))
    for site in sys.path:
        candidates += glob.glob(os.path.join(site, "nvidia", "cu*", "bin", name))
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    fail(f"no {name} found (pip install nvidia-cuda-cuobjdump into .venv, or set {name.upper()})")
    return ""


def read_markers() -> list[dict]:
    markers = []
    for path in sorted(glob.glob(os.path.join(ROOT, "cuda", "**", "*.cu*"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                m = MARKER.search(line)
                if not m:
                    continue
                fields = dict(kv.split("=", 1) for kv in m.group(1).split())
                missing = {"kernel", "tiles_per_iter", "tile", "bytes_per_tile", "max_per_tile"} - fields.keys()
                if missing:
                    fail(f"{path}:{number}: marker lacks {sorted(missing)}")
                fields["where"] = f"{os.path.relpath(path, ROOT)}:{number}"
                markers.append(fields)
    if not markers:
        fail("no SALR_BUDGET markers under cuda/")
    return markers


def build(tu: str, arch: str, nvcc: str, cuobjdump: str, workdir: str) -> dict:
    exe = os.path.join(workdir, f"{os.path.basename(tu)}.{arch}")
    cmd = [nvcc, "-std=c++20", f"-arch={arch}", "-O3", "-I", os.path.join(ROOT, "cpp"), "-I", os.path.join(ROOT, "cuda"),
           "-Xptxas", "-v", "-o", exe, tu]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        fail(f"nvcc failed on {tu} ({arch}):\n{proc.stderr[-4000:]}")
    run = subprocess.run([exe], capture_output=True, text=True)
    if run.returncode != 0:
        fail(f"{exe} exited {run.returncode}: {run.stderr[-2000:]}")
    dynamic = {}
    for line in run.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "SALR_BUDGET_SMEM":
            dynamic[parts[1]] = int(parts[2])
    sass = subprocess.run([cuobjdump, "-sass", exe], capture_output=True, text=True)
    if sass.returncode != 0:
        fail(f"cuobjdump failed on {exe}: {sass.stderr[-2000:]}")
    return {"ptxas": parse_ptxas(proc.stderr), "sass": parse_sass(sass.stdout), "dynamic": dynamic}


def parse_ptxas(log: str) -> dict:
    info, current = {}, None
    for line in log.splitlines():
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            info.setdefault(current, {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            info[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            info[current]["smem"] = int(s.group(1)) if s else 0
    return info


def parse_sass(text: str) -> dict:
    funcs, current = {}, None
    for line in text.splitlines():
        m = FUNC.match(line)
        if m:
            current = m.group(1)
            funcs[current] = []
            continue
        if current is None:
            continue
        m = INSTR.search(line)
        if m:
            funcs[current].append((int(m.group(1), 16), m.group(3), m.group(4).strip()))
    return funcs


def branch_target(operands: str) -> int | None:
    m = BRANCH_TARGET.search(operands.split(",")[-1].strip())
    return int(m.group(1), 16) if m else None


def main_loop(instrs: list) -> dict | None:
    loops = []
    for addr, op, operands in instrs:
        if op.startswith("BRA"):
            target = branch_target(operands)
            if target is not None and target <= addr:
                body = [i for i in instrs if target <= i[0] <= addr]
                loops.append({"start": target, "end": addr, "body": body,
                              "mma": sum(1 for i in body if MMA.match(i[1]))})
    if not loops:
        return None
    most = max(loop["mma"] for loop in loops)
    loop = min((l for l in loops if l["mma"] == most), key=lambda l: l["end"] - l["start"])
    loop["nested"] = sum(1 for l in loops if l is not loop and loop["start"] <= l["start"] and l["end"] <= loop["end"]
                         and (l["start"], l["end"]) != (loop["start"], loop["end"]))
    loop["forward"] = 0
    for addr, op, operands in loop["body"]:
        if op.startswith("BRA") and addr != loop["end"]:
            target = branch_target(operands)
            if target is not None and target > addr:
                loop["forward"] += 1
    return loop


def occupancy(arch: str, regs: int, smem: int, threads: int) -> tuple[int, str]:
    sm_smem, _, sm_regs, sm_warps, sm_blocks = ARCH_LIMITS[arch]
    warps = (threads + 31) // 32
    regs_per_warp = (max(regs, 1) * 32 + 255) // 256 * 256
    limits = {"registers": sm_regs // (regs_per_warp * warps), "warps": sm_warps // warps, "blocks": sm_blocks,
              "shared memory": sm_smem // (smem + 1024)}
    reason = min(limits, key=limits.get)
    return limits[reason], reason


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="also write the table (markdown) here")
    parser.add_argument("--archs", default="sm_90a,sm_80")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    archs = args.archs.split(",")
    markers = read_markers()
    nvcc = os.environ.get("NVCC") or find_tool("nvcc")
    cuobjdump = find_tool("cuobjdump")
    tus = sorted(glob.glob(os.path.join(ROOT, "cuda", "budget", "*.cu")))
    if not tus:
        fail("no translation units in cuda/budget/")
    with tempfile.TemporaryDirectory() as workdir, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        jobs = {(tu, arch): pool.submit(build, tu, arch, nvcc, cuobjdump, workdir) for tu in tus for arch in archs}
        builds = {key: job.result() for key, job in jobs.items()}

    rows, problems, notes = [], [], []
    for marker in markers:
        pattern = re.compile(marker["kernel"])
        tiles, limit = int(marker["tiles_per_iter"]), float(marker["max_per_tile"])
        threads, bytes_per_tile = int(marker.get("threads", 128)), float(marker["bytes_per_tile"])
        matched = 0
        sink = notes if marker.get("gate") == "report" else problems
        for (tu, arch), result in sorted(builds.items(), key=lambda kv: (kv[0][1] != "sm_90a", kv[0])):
            for name, instrs in result["sass"].items():
                if not pattern.search(name):
                    continue
                matched += 1
                ptx = result["ptxas"].get(name, {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0})
                smem = ptx["smem"] + sum(v for k, v in result["dynamic"].items() if re.search(k, name))
                local = sum(1 for i in instrs if i[1].startswith(("LDL", "STL")))
                loop = main_loop(instrs)
                short = re.sub(r"^_Z\w*?(stream_forward_kernel|sparse_mma_forward_kernel)", r"\1", name)[:72]
                if loop is None or loop["mma"] == 0:
                    sink.append(f"{arch} {short}: no main loop with MMA instructions found")
                    continue
                per_tile = len(loop["body"]) / tiles
                blocks, reason = occupancy(arch, ptx["regs"], smem, threads)
                budgets = " / ".join(f"{g} {sms * sch * ghz * 1e9 / (0.9 * bw * 1e12 / bytes_per_tile):.0f}"
                                     for g, (sms, sch, ghz, bw) in GPUS.items())
                rows.append(f"| {short} | {arch} | {len(loop['body'])} | {tiles} ({marker['tile']}) | **{per_tile:.1f}** | "
                            f"{limit:g} | {ptx['regs']} | {smem} | {ptx['stack']} | {ptx['spill_st']}/{ptx['spill_ld']} | "
                            f"{local} | {loop['forward']} | {loop['nested']} | {blocks} x {threads} ({reason}) | {budgets} |")
                if arch == "sm_90a" and per_tile > limit:
                    sink.append(f"{arch} {short}: {per_tile:.1f} warp-instructions per tile > max {limit:g}")
                if ptx["spill_st"] or ptx["spill_ld"] or ptx["stack"] or local:
                    sink.append(f"{arch} {short}: spills / stack frame / local memory")
                if loop["forward"]:
                    sink.append(f"{arch} {short}: {loop['forward']} forward branch(es) inside the main loop")
        if matched == 0:
            problems.append(f"marker at {marker['where']}: kernel={marker['kernel']} matches no compiled kernel")

    table = ["| kernel | arch | instr/iter | tiles/iter | **per tile** | max | regs | smem B | stack | spills st/ld | "
             "LDL/STL | fwd branches | nested loops | blocks/SM | budget/tile at 90% HBM |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"] + rows
    text = "\n".join(table)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)
    for n in notes:
        print(f"cuda_budget: not gated (gate=report): {n}", file=sys.stderr)
    for p in problems:
        print(f"cuda_budget: FAIL {p}", file=sys.stderr)
    print(f"cuda_budget: {'FAIL' if problems else 'OK'} ({len(rows)} kernel builds checked)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
