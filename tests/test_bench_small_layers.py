"""bench/cpu_small_layers.py's machinery, cache-resident and streamed (--working-set-mb): every
variant of every shape is timed and printed. Timings in a test mean nothing; the table's structure
and the rotation over copies do."""

from __future__ import annotations

import pytest

import salr
from salr_helpers import load_bench_script


@pytest.fixture(scope="module")
def small_layers():
    return load_bench_script("cpu_small_layers")


def table_rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]


@pytest.mark.parametrize("working_set_mb", [0, 1.5])
def test_every_shape_and_variant_is_timed(small_layers, capsys, working_set_mb):
    isas = salr.available_cpu_isas()[-1:]  # the widest path this CPU has
    small_layers.main(["--isa", *isas, "--dtype", "bf16", "--calls", "2", "--repeats", "1",
                       "--working-set-mb", str(working_set_mb)])
    out = capsys.readouterr().out
    assert ("streamed (1.5 MB" in out) == bool(working_set_mb)
    header, *rows = table_rows(out)
    assert header[:5] == ["shape", "dtype", "dense", "dense+lora", "nn.Linear"] and len(header) == 5 + 5 * len(isas)
    assert [r[0] for r in rows] == ["576x576", "192x576", "1536x576", "576x1536"]
    for row in rows:
        assert all(float(cell.rstrip("×")) > 0 for cell in row[2:])


def test_rotation_calls_every_copy_in_turn(small_layers):
    calls = []
    copies = [{"f": (lambda i=i: calls.append(i))} for i in range(3)]
    run = small_layers.rotating(copies, "f")
    for _ in range(7):
        run()
    assert calls == [0, 1, 2, 0, 1, 2, 0]
