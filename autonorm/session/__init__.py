"""One GPU session: the most valuable hardware evidence from a single call of a few minutes
(`scripts/gpu_session.py` is its command line; docs/GPU_RUNBOOK.md says how to run one).

Phases, most valuable first, each in its own process (a sticky CUDA error ends only that
process) under its own share of the budget; a share a phase leaves unused goes to the next:

  env            versions, device, clocks, the device-to-device copy bandwidth (1 GiB, CUDA events)
  smoke-triton   ~33 correctness cases per backend (`cases.smoke_cases`), inputs and the fp64
  smoke-cupy     reference on the device, compared through autonorm.verify; pass/fail with the error
  smoke-numba
  bench          bf16 RMS/LN fwd/bwd at N = 4K..256K, M*N = 2^27: copy, torch, Liger, every
                 backend's heuristic (torch.compile after, if time is left)
  variants       each kernel variant (`cases.variant_cases`) against its backend's heuristic,
                 checked, then timed interleaved
  tune           a small database: bf16 RMS/LN fwd/bwd at N=4096 (then 8192), 16K rows, <= 12 trials
  sweep          every Triton config of rmsnorm bwd bf16 N=4096 in random order until the budget ends

Every finished case is appended at once as one JSON line, so a run cut at any point keeps what
it finished. A phase process that dies (not cut) is restarted and skips its finished cases; the
case it died in is recorded as crashed. The human summary is printed last, also after a cut or
a signal. The out folder holds at most the 7 files of `records.FILES`.

The dry run walks every phase on the CPU at small sizes (Triton interpreter, Numba simulator,
CPU timers) and writes the same files; its device slug starts with `dry-run-`, and its
numbers prove the pipeline only, never speed.

Modules: `records` (the files), `driver` (the parent: shares, restarts, signals), `phase` (what a
phase process shares, and the on-device check), `cases`, `phases`, `summary`, `importer` (the files
into the database, the report and the search table).
"""
