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
forward (h written), a bias for LayerNorm; the heuristic config of each backend; {rows}
(Numba up to N = {numba_max}: its simulator is too slow beyond).

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

What the chunked Triton paths (rows larger than one block) do:
- forward, two passes: x and the residual are read once while h is written and the statistics are
  reduced (LayerNorm: per-chunk count, mean and M2 merged with Chan's update, centered), then h (x
  without a residual) is read back once to normalize, last chunk first so that the re-read starts
  with what is most likely still in L2. With the residual fused that is 5 tensor passes for an ideal
  of 4 (1.25); without it, 3 for 2 (1.50). The earlier three-pass LayerNorm read x and the
  residual three times (2.00 in this table), RMSNorm twice (1.50).
- backward: x and dy are read twice (the row reductions, then dx): 5 passes for 3 (1.67);
  `DW_COLUMN_OUTER=1` (the heuristic's choice there) walks column chunks
  outside the program's rows, so dW/dB stay in registers and each partial row is written once
  (4 bytes per element and parameter per program); `DW_COLUMN_OUTER=0` read-modify-writes the
  partial row for every row (8 bytes per element and parameter per row), walking the row's second
  read last chunk first.

The Numba CUDA forward keeps rows up to its block's registers (N <= 4096 above, hence 1.00); beyond,
it makes two passes: pass 1 reads x (and the residual, writing h) and reduces the statistics
(LayerNorm: each thread's count, mean and M2 by Welford's update, merged over the block with Chan's),
pass 2 normalizes. With `row_cache=shared` (the heuristic's choice wherever the row and the reduction
buffers fit Numba's 48 KiB of static shared memory: bf16 rows up to about 22K elements, fp32 11K),
pass 1 leaves the row (h with a residual) in shared memory in the input dtype and pass 2 reads it
there: every tensor once, 1.00. Longer rows (`row_cache=global`) read h (or x) back from global memory,
last chunk first (`tests/test_traffic.py` checks the counts at N = 300 and, from the order of the counted
accesses, that the second pass over a chunked row starts in its last chunk: Triton's and Numba's forward,
and their backward with per-row partials). With the residual fused:
5 tensor passes for an ideal of 4 (1.25) for both ops; before, LayerNorm made three passes reading x and
the residual each time (2.00) and RMSNorm two (1.50). The row
tensors move as 64-bit words (4 bf16 or fp16, 2 fp32 elements an access; Numba has no 128-bit type),
unpacked in registers, and so do the weight and bias (an fp32 weight under 4 16-bit elements: 2 words).
Its backward with the row in registers loads each thread's weight columns once for all the slot's rows,
sums their dW/dB in registers and writes each row slot's partial row once (4 bytes per element and
parameter per slot: the simulator runs 2 blocks, so the weight is read twice and there is one partial row
per 2 of the table's 4 rows); with `prefetch=1` it fetches each slot's next row (x, dy and the
statistics) before this row's reductions and moves the same bytes (`tests/test_traffic.py` checks it).
Chunked rows (N > 8192 with the heuristic) read x, dy and the weight twice a row; with
`partials=columns` (the heuristic's choice there) the second pass walks each column word down the slot's
rows, summing dW/dB in registers and writing each partial once, where `partials=rows` read-modify-writes
the partial row for every row (8 bytes per element and parameter per row), re-reading the row last chunk
first.

CuPy kernels run only on a GPU, so their traffic is derived from the kernels' loop structure
(`templates/cupy/`) instead of counted, for the same specs (ideal: 4 tensor passes forward, 3
backward):
- row in registers (`row_cache=registers`) or in shared memory (`shared`, in the input dtype, up to
  226 KiB a block with the opt-in; the heuristic's choice up to A100's 163 KiB: bf16 rows of up to
  about 80K elements forward, 40K backward): every tensor once, 1.00;
- row split over a thread-block cluster (`cluster2`, `cluster4`, `cluster8`, sm_90+): each of the C
  blocks caches a 1/C slice of the row in its shared memory and the row's statistics merge through
  distributed shared memory in rank order, so x is read once for bf16 rows up to C x 113K elements
  (every 256K row with C = 4): 1.00. The backward caches x and dy of the slice (bf16 rows up to C x 56K
  elements), merges its two row sums the same way (one cluster barrier a row), and each cluster loops
  over rows, so each block sums its slice's dW/dB over them: in registers (`partials=registers`) while
  a thread's share of the slice fits (RMSNorm up to C x 16K, LayerNorm with a bias C x 8K: 128K and 64K
  with C = 8), else in shared memory beside the slice (`partials=shared`, up to 226 KiB a block: bf16
  RMSNorm up to C x 28K, LayerNorm with a bias C x 19K: 231K and 154K with C = 8): 1.00 plus one partial
  row per cluster. The heuristic does not pick a cluster (one
  heuristic serves GPUs without clusters); the tuner audits and times it on sm_90;
- no cache (`none`, any N), forward: pass 1 reads x and the residual and writes h, reducing the
  statistics (LayerNorm: per-vector count, mean and M2 merged with Chan's update), pass 2 reads h back
  (last vector first) and writes y: 5 passes for 4 (1.25), for both ops; without a residual, x is read
  twice: 3 for 2 (1.50). Before, RMSNorm re-read x and the residual (1.50) and LayerNorm made three
  passes over them (2.00);
- no cache, backward: x and dy are read twice: 5 passes for 3 (1.67); the row-by-row second pass
  (`partials=registers` or `global`) starts at the row's last vector;
- dW/dB partials (`partials=registers`): each thread keeps its columns' sums in registers across its
  rows and writes its partial row once per row group (4 bytes per element and parameter per group). With
  the row in registers this is the only choice; with the `shared` and `none` caches it needs a thread's
  columns to fit a quarter of its registers (16 elements at 1024 threads: the heuristic's choice for
  RMSNorm up to 16K; LayerNorm with a bias holds twice as many sums, which past its register row cache
  at 8K no longer fit). Beyond, with the row in shared memory, `partials=shared` keeps the fp32 sums
  beside it in shared memory (4 bytes per element and parameter a block, added to for every row by the
  one thread that owns the column) and writes the partial row once: 1.00 plus one partial row per block,
  the heuristic's choice where the row and the sums fit A100's 162 KiB (bf16 RMSNorm up to about 20K,
  LayerNorm with a bias 13K); where they do not, `partials=global` read-modify-writes the
  partial row for every row (8 bytes per element and parameter per row, an L2 round trip by the one
  thread that owns the column); with no row cache, `partials=columns` (the heuristic's choice there)
  keeps the row sums dx needs (4 bytes a row, 8 for LayerNorm) and makes its second pass column-outer:
  each thread walks its column vectors down its rows, summing dW/dB in registers, and writes each
  partial once, so the rows' second read is the only extra traffic.

| backend | op | dir | N | path | rows / ideal | weight reads | scratch / elem |
|---|---|---|---|---|---|---|---|
"""


# The Numba simulator takes tens of minutes per LayerNorm call at N = 65537 on a loaded 2-core VM.
SIMULATOR_MAX_HIDDEN = 4096


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
    parser.add_argument("--numba-max-hidden", type=int, default=SIMULATOR_MAX_HIDDEN,
                        help="skip larger N for the Numba simulator (one Python thread per CUDA thread: slow)")
    parser.add_argument("--backends", nargs="+", default=["triton", "numba"])
    args = parser.parse_args(argv)
    lines = []
    for name in args.backends:
        backend = get_backend(name)
        for op in ("rmsnorm", "layernorm"):
            for direction in ("fwd", "bwd"):
                for n in args.hidden:
                    if name == "numba" and n > args.numba_max_hidden:
                        continue
                    spec = spec_for(op, direction, n)
                    config = backend.heuristic(spec)
                    m = traffic.measure(backend, spec, config, rows_for(n))
                    line = (f"| {name} | {op} | {direction} | {n} | {path(backend, spec, config)} | "
                            f"{m.row_ratio:.2f} | {m.param_reads:.1f} | {m.scratch / (m.rows * n):.1f} |")
                    print(line, flush=True)
                    lines.append(line)
    rows = ", ".join(f"{rows_for(n)} rows at N = {n}" for n in args.hidden)
    with open(args.out, "w") as f:
        f.write(HEADER.format(rows=rows, numba_max=args.numba_max_hidden) + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
