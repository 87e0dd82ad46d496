"""CPU benchmark of salr.sparse_lowrank_gemm against dense torch: the harness lives in the package
(``salr.cli.bench``, also ``salr bench``) so an installed salr can measure itself; see its docstring.

  python bench/bench_gemm.py                 # the full grid
  python bench/bench_gemm.py --quick         # 11008x4096, M in {1, 16, 128}
  python bench/bench_gemm.py --crossover     # sweep M to place kDenseCrossoverRows
"""

from salr.cli.bench import main

if __name__ == "__main__":
    main()
