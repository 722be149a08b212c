"""Write docs/benchmarks/traffic.md: global-memory bytes per kernel call against the ideal, on CPU.

Counts what each kernel asks of global memory in the Triton interpreter and the
Numba CUDA simulator (autonorm/traffic.py), for the heuristic config of every
backend x op x direction x N, bf16 with a bf16 weight, the residual fused in the
forward and a bias for LayerNorm. No GPU and no timing: pass counts only.

    python scripts/traffic.py [--out docs/benchmarks/traffic.md] [--hidden 1024 4096 65537]
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

from autonorm import traffic  # noqa: E402  (after the environment above)
from autonorm.backends import get_backend  # noqa: E402
from autonorm.backends.triton import next_pow2  # noqa: E402
from autonorm.spec import NormSpec  # noqa: E402

HEADER = """# Global-memory traffic per call (counted on CPU)

Made by `python scripts/traffic.py`. Bytes each kernel reads and writes in global memory in one
call, counted by hooking the loads and stores of the Triton interpreter and the array accesses of
the Numba CUDA simulator (`autonorm/traffic.py`; lanes a mask switches off are not counted). No GPU
ran: these are pass counts, not speeds. Specs: bf16 input and weight, the residual fused in the
forward (h written), a bias for LayerNorm; the heuristic config of each backend; {rows}.

- **rows / ideal**: bytes moved to and from the row tensors (x, residual, y, h, dy, dh, dx and the
  per-row mean/rstd) over one read or write of each: 1.00 means every tensor is touched once, 2.00
  that the row is re-read from global memory (from L2 at best on a GPU).
- **weight reads**: how many times the weight (and bias) were read in full, about once per program
  (served by L2 on a GPU).
- **scratch / elem**: bytes per row element to buffers the kernel allocates itself (fp32 dW/dB
  partials in the backward), read and written by the kernel; the final sum over them is a torch op
  and is not counted.
- The Numba simulator counts each thread's access: a value every thread of a block reads (the row's
  mean and rstd in the backward) counts once per thread, where a GPU serves a warp with one load.

| backend | op | dir | N | path | rows / ideal | weight reads | scratch / elem |
|---|---|---|---|---|---|---|---|
"""


def spec_for(op: str, direction: str, n: int) -> NormSpec:
    return NormSpec(op, direction, "bfloat16", "bfloat16", n, residual=direction == "fwd",
                    bias=op == "layernorm")


def rows_for(n: int) -> int:
    return 2 if n > 10_000 else 4


def path(backend, spec, config) -> str:
    if backend.name == "triton":
        block = config.BLOCK_N
        return "whole row" if block >= next_pow2(spec.hidden) else f"{-(-spec.hidden // block)} chunks"
    return "-"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/benchmarks/traffic.md")
    parser.add_argument("--hidden", type=int, nargs="+", default=[1024, 4096, 65537])
    parser.add_argument("--backends", nargs="+", default=["triton", "numba"])
    args = parser.parse_args(argv)
    lines = []
    for name in args.backends:
        backend = get_backend(name)
        for op in ("rmsnorm", "layernorm"):
            for direction in ("fwd", "bwd"):
                for n in args.hidden:
                    spec = spec_for(op, direction, n)
                    config = backend.heuristic(spec)
                    m = traffic.measure(backend, spec, config, rows_for(n))
                    line = (f"| {name} | {op} | {direction} | {n} | {path(backend, spec, config)} | "
                            f"{m.row_ratio:.2f} | {m.param_reads:.1f} | {m.scratch / (m.rows * n):.1f} |")
                    print(line, flush=True)
                    lines.append(line)
    rows = ", ".join(f"{rows_for(n)} rows at N = {n}" for n in args.hidden)
    with open(args.out, "w") as f:
        f.write(HEADER.format(rows=rows) + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
