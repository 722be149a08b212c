"""`autonorm audit` and the hardware-fit gate: every heuristic kernel of the standard grid and every
record shipped in tuning_db/ fits sm_80 and sm_90 (no spill, registers x threads within an SM's 64K
registers, 128-bit loads of x wherever N * itemsize is a multiple of 16).

The kernels are cross-compiled by the real toolchains (Triton + ptxas from its wheel, nvcc for the
CuPy sources, numba-cuda with the NVVM wheel); no GPU is needed. Compiled profiles are cached by
source hash under the autonorm cache folder, so a rerun is quick.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from fakes import audited

from autonorm import audit
from autonorm.backends import get_backend
from autonorm.cli import audit as audit_cli
from autonorm.grids import STANDARD
from autonorm.spec import NormSpec

ARCHS = ("sm_80", "sm_90")
TUNING_DB = Path(__file__).resolve().parent.parent / "tuning_db"


def _missing(backend: str) -> str | None:
    """Why this backend's kernels cannot be compiled here, or None."""
    try:
        audit.check_backends([backend])
    except audit.AuditToolError as exc:
        return str(exc)
    return None


def _skip_unless(backend: str):
    reason = _missing(backend)
    if reason:
        pytest.skip(reason)


# --- the rules, without compiling ----------------------------------------------------------
def test_register_cap_is_min_of_255_and_65536_over_threads():
    assert audit.register_cap(128) == 255 and audit.register_cap(256) == 255
    assert audit.register_cap(512) == 128 and audit.register_cap(1024) == 64
    assert audit.register_cap(768) == 80  # 85, in the allocation unit of 8


def test_occupancy_of_a_block_over_the_register_file_is_zero():
    # 72 registers x 1024 threads = 73,728 > 65,536: the launch would fail on hardware.
    blocks, limiter = audit.resident_blocks(72, 1024, 0, audit.ARCHS["sm_90"])
    assert (blocks, limiter) == (0, "registers")
    assert audit.resident_blocks(64, 1024, 0, audit.ARCHS["sm_90"]) == (1, "registers")
    # Shared memory: 100 KB blocks, 2 resident on sm_90 (228 KB), 1 on sm_80 (164 KB).
    assert audit.resident_blocks(32, 128, 100 * 1024, audit.ARCHS["sm_90"])[0] == 2
    assert audit.resident_blocks(32, 128, 100 * 1024, audit.ARCHS["sm_80"])[0] == 1
    # Small blocks: the 32-blocks-per-SM limit.
    assert audit.resident_blocks(16, 32, 0, audit.ARCHS["sm_80"]) == (32, "blocks")


PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'an_fwd_vec_0' for 'sm_90'
ptxas info    : Function properties for an_fwd_vec_0
    120 bytes stack frame, 240 bytes spill stores, 236 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 128 bytes smem, 424 bytes cmem[0]
ptxas info    : Compiling entry function 'an_fwd_scalar_0' for 'sm_90'
ptxas info    : Function properties for an_fwd_scalar_0
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 424 bytes cmem[0]
"""


def test_cache_key_does_not_depend_on_the_other_backends_audited(monkeypatch):
    """A kernel audited alone and beside other backends' kernels has one cache key: keyed by every
    audited backend's tool versions, the whole cache missed whenever the set of backends changed."""
    import autonorm.audit.run as audit_run

    monkeypatch.setattr(audit_run, "toolchain", lambda backends: {"ptxas": "13.4", **{b: "1.0" for b in backends}})
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 4096)
    jobs = [audit.Job(b, spec, get_backend(b).heuristic(spec), "sm_90") for b in ("cupy", "triton")]
    assert audit_run.cache_keys(jobs[:1]) == audit_run.cache_keys(jobs)[:1]
    assert len(set(audit_run.cache_keys(jobs))) == 2


def test_ptxas_log_is_parsed_per_function():
    info = audit.parse_ptxas_log(PTXAS_LOG)
    assert info["an_fwd_vec_0"] == {"registers": 64, "stack": 120, "spill_stores": 240, "spill_loads": 236,
                                    "smem_static": 128}
    assert info["an_fwd_scalar_0"]["registers"] == 40 and info["an_fwd_scalar_0"]["smem_static"] == 0


def test_sass_counts_tell_cp_async_from_global_loads():
    """LDGSTS (cp.async) is counted as such, and as a global load of its width (the gate's 128-bit loads of x
    may arrive by cp.async); its commit LDGDEPBAR and shared-memory accesses are neither."""
    listing = "\n".join([
        "\t\tFunction : an_bwd_vec",
        "        /*0360*/               @P2 LDGSTS.E.BYPASS.128 [R21], desc[UR6][R4.64] ;   /* 0x0000000004152fae */",
        "        /*0370*/                   LDGDEPBAR ;                                       /* 0x00000000000079af */",
        "        /*0380*/                   LDG.E.128 R8, desc[UR6][R2.64] ;                  /* 0x0000000602087981 */",
        "        /*0390*/                   LDG.E.64 R4, desc[UR6][R6.64] ;                   /* 0x0000000606047981 */",
        "        /*03a0*/                   LDS.128 R12, [R21] ;                              /* 0x0000000015127984 */",
        "        /*03b0*/                   STG.E.128 desc[UR6][R10.64], R8 ;                 /* 0x000000080a007986 */",
    ])
    counts = audit.tools.parse_sass(listing)["an_bwd_vec"]
    assert counts["cp_async"] == 1
    assert (counts["global_loads"], counts["global_loads_128"], counts["global_loads_64"]) == (3, 2, 1)
    assert (counts["global_stores"], counts["global_stores_128"]) == (1, 1)


def test_gate_names_spills_unlaunchable_blocks_and_scalar_loads():
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096)
    p = audit.Profile("cupy", spec.short(), "c", "sm_90", "k", registers=72, spill_stores=8, spill_loads=8,
                      stack=16, smem_static=0, smem_dynamic=0, threads=1024, global_loads=4, global_loads_128=0,
                      global_loads_64=0,
                      global_stores=1, global_stores_128=0, cp_async=0, sass_sha256="")
    audit.occupancy(p, audit.ARCHS["sm_90"])
    problems = audit.gate_failures(p, spec)
    assert len(problems) == 3, problems
    odd = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4097)  # rows not 16-byte aligned: no vector demand
    assert len(audit.gate_failures(p, odd)) == 2
    # Numba CUDA's widest access is a 64-bit word: it is asked for 8-byte loads on 8-byte aligned rows.
    scalar = audit.Profile("numba", spec.short(), "c", "sm_90", "k", registers=32, spill_stores=0, spill_loads=0,
                           stack=0, smem_static=0, smem_dynamic=0, threads=256, global_loads=16, global_loads_128=0,
                           global_loads_64=0, global_stores=16, global_stores_128=0, cp_async=0, sass_sha256="")
    audit.occupancy(scalar, audit.ARCHS["sm_90"])
    assert audit.gate_failures(scalar, spec) == ["no 64-bit global load although rows are 8-byte aligned"]
    assert not audit.gate_failures(scalar, NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4098))
    scalar.global_loads_64 = 4
    assert not audit.gate_failures(scalar, spec)


def test_triton_space_has_no_num_stages():
    # num_stages produced identical cubins for every template (loads without a dot are not pipelined).
    assert "num_stages" not in get_backend("triton").config_cls.domain()


@pytest.mark.parametrize("backend", ["triton", "cupy"])
def test_heuristic_register_budgets_follow_the_block(backend):
    """Every heuristic of the standard grid keeps per-thread row data within its block's register cap."""
    b = get_backend(backend)
    for spec in STANDARD.specs():
        c = b.heuristic(spec)
        if backend == "triton":
            from autonorm.backends.triton import max_per_thread, next_pow2
            tile = c.BLOCK_N * c.ROWS_PER_PROGRAM
            assert tile // (32 * c.num_warps) <= max_per_thread(spec.direction, c.num_warps), (spec.short(), c)
            assert c.BLOCK_N <= next_pow2(spec.hidden)
        else:
            from autonorm.backends.cupy_config import max_reg_elems
            if c.row_cache == "registers":
                items = -(-spec.hidden // (c.threads // c.rows * c.vec)) * c.vec
                assert items <= max_reg_elems(spec.direction, c.threads), (spec.short(), c)


def test_search_space_on_cpu_is_not_audited(monkeypatch):
    from autonorm.tune import SearchSpace

    def fail(*args, **kwargs):
        raise AssertionError("the audit runs only for CUDA devices")

    monkeypatch.setattr(audit, "unfit", fail)
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 4096)
    space = SearchSpace(spec, {"triton": get_backend("triton")}, torch.device("cpu"))
    assert len(space) == len(get_backend("triton").space(spec))
    assert space.unfit(space.candidates()) == {}


def test_a_gpu_winner_records_its_profile(monkeypatch):
    """The tuner keeps the winner's audit profile on the tuning GPU in its record; on a CPU, or for
    torch, there is none."""
    from autonorm.db import Entry
    from autonorm.tune import finalize

    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096)
    config = get_backend("triton").heuristic(spec)
    props = types.SimpleNamespace(major=8, minor=0, multi_processor_count=108)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(audit.run, "check_backends", lambda names: None)
    jobs_seen = []

    def fake_audit(jobs, progress=None, workers=2):
        jobs_seen.extend(jobs)
        return [audited(jobs[0], registers=40, global_loads=4)]

    monkeypatch.setattr(audit.run, "audit", fake_audit)
    gpu = types.SimpleNamespace(device=torch.device("cuda", 0), spec=spec)
    winner = Entry("triton", config, 10.0, 9.0, 11.0, 100.0, 50.0)
    profile = finalize._winner_profile(gpu, winner)
    assert [(j.backend, j.config, j.arch) for j in jobs_seen] == [("triton", config, "sm_80")]
    assert profile["arch"] == "sm_80" and profile["registers"] == 40 and profile["spill_bytes"] == 0
    assert 0 < profile["occupancy"] <= 1 and profile["load_share_128"] == 1.0
    assert finalize._winner_profile(types.SimpleNamespace(device=torch.device("cpu"), spec=spec), winner) is None
    from autonorm.config import NoConfig
    assert finalize._winner_profile(gpu, Entry("torch", NoConfig(), 10.0, 9.0, 11.0, 1.0, 1.0)) is None


def test_prune_space_drops_what_does_not_fit(monkeypatch):
    """A whole space judged: configs whose profile spills are gone; others stay (the tuner audits each
    candidate before it compiles it instead: tests/test_space_audit.py)."""
    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 4096)
    triton = get_backend("triton")
    full = triton.space(spec)
    props = types.SimpleNamespace(major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    monkeypatch.setattr(audit.run, "check_backends", lambda names: None)

    def fake_audit(jobs, progress=None, workers=2):
        # pretend every 8-warp config spills
        return [audited(j, spill_stores=4 * (j.config.num_warps == 8), threads=32 * j.config.num_warps) for j in jobs]

    monkeypatch.setattr(audit.run, "audit", fake_audit)
    kept = audit.prune_space(spec, {"triton": full}, torch.device("cuda", 0))["triton"]
    assert kept and len(kept) < len(full)
    assert all(c.num_warps != 8 for c in kept)
    assert len(kept) == sum(c.num_warps != 8 for c in full)


def test_missing_toolchain_names_what_to_install(monkeypatch, capsys):
    monkeypatch.setattr(audit.tools, "_TOOLS", {"ptxas": [], "cuobjdump": [], "nvcc": []})
    rc = audit_cli.main(_args(backends="triton", hidden=4096))
    assert rc == 1
    err = capsys.readouterr().err
    assert "ptxas" in err and "pip install autonorm[audit]" in err


def test_bad_values_are_reported_as_every_command_reports_them(capsys):
    from autonorm.cli import main

    for argv, problem in ((["audit", "--grid", "huge"], "unknown grid 'huge'"),
                          (["audit", "--arch", "sm_70"], "unknown --arch 'sm_70'"),
                          (["audit", "--hidden", "64", "--dtype", "int8"], "int8")):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("autonorm audit: error: ") and problem in err, err


def test_help_imports_neither_optuna_nor_a_backend():
    code = ("import sys, contextlib, io\nfrom autonorm.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n    main([])\n"
            "print(sorted(m for m in ('optuna', 'triton', 'numba', 'cupy', 'autonorm.audit') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _args(**kw):
    base = dict(arch="sm_90", backends="triton", grid=None, db=None, hidden=None, op="rmsnorm", direction="fwd",
                dtype="bfloat16", space=False, json=True, markdown=False, doc=False, cached_only=False, dtypes=None,
                save=None, against=None)
    return types.SimpleNamespace(**{**base, **kw})


# --- compiled ------------------------------------------------------------------------------
def test_cli_json_reports_vector_loads_for_unaligned_n_with_aligned_rows(capsys):
    """N=760 bf16: the row stride is not a multiple of 16 elements, but 760 * 2 bytes is a multiple of
    16: the ROW_ALIGN hint makes Triton load x 16 bytes at a time (without it: 0 of 9 loads)."""
    _skip_unless("triton")
    assert audit_cli.main(_args(hidden=760)) == 0
    (line,) = capsys.readouterr().out.strip().splitlines()
    p = json.loads(line)
    assert p["backend"] == "triton" and p["arch"] == "sm_90" and p["problems"] == []
    assert p["global_loads_128"] >= 1 and p["spill_bytes"] == 0 and p["blocks_per_sm"] >= 1


# A subset that keeps CI within its budget: every backend, op and direction, both archs, at the
# sizes where the register cliffs were (64K: forward; 16K: backward; 4K: numba's fp32 backward).
SUBSET = [NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 65536),
          NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 16384),
          NormSpec("layernorm", "fwd", "float16", "float16", 16384),
          NormSpec("layernorm", "bwd", "float32", "float32", 4096),
          # chunked rows: Numba's LayerNorm spilled here until its launch bounds asked for one block fewer,
          # and its RMSNorm spills on sm_80 when asked the same
          NormSpec("layernorm", "bwd", "float32", "float32", 12288),
          NormSpec("rmsnorm", "fwd", "float32", "float32", 16384),
          # CuPy's register-cached backward spilled 140 bytes on sm_80 here until it stated one block an SM
          # as its minimum; Numba's LayerNorm forward with the row cached by 1024 threads spilled 8 bytes
          NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 5120),
          NormSpec("layernorm", "fwd", "float16", "float16", 8192)]


def _gate(jobs):
    failures = []
    for job, p in zip(jobs, audit.audit(jobs)):
        problems = audit.gate_failures(p, job.spec)
        if problems:
            failures.append(f"{job.backend} {job.arch} {job.spec.short()} {job.config.short()}: {'; '.join(problems)}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow  # compiles afresh (~50 s cold); the saved-report gate covers every heuristic in the default run
@pytest.mark.parametrize("backend", audit.BACKENDS)
def test_heuristics_fit_subset(backend):
    _skip_unless(backend)
    _gate(audit.heuristic_jobs(SUBSET, [backend], ARCHS))


@pytest.mark.slow  # compiles the prefetch variants of several specs (~10 s)
def test_backward_prefetch_fits():
    """BWD_PREFETCH=1 keeps the next row group's x and dy in registers beside the current ones: the tile
    budget is_valid grants it compiles without spilling (not the heuristic's choice, so the grid does not
    cover it)."""
    _skip_unless("triton")
    jobs = []
    for op in ("rmsnorm", "layernorm"):
        spec = NormSpec(op, "bwd", "bfloat16", "bfloat16", 4096, bias=op == "layernorm")
        config = get_backend("triton").heuristic(spec).replace(BWD_PREFETCH=1)
        assert get_backend("triton").config_cls.is_valid(spec, config) is None
        jobs += [audit.Job("triton", spec, config, arch) for arch in ARCHS]
    _gate(jobs)


def test_cupy_backward_prefetch_into_shared_memory_fits():
    """prefetch=1 with the row in shared memory copies x and dy by cp.async (LDGSTS in the SASS, 16 bytes each)
    into a second buffer: the LayerNorm heuristic at 16K (shared memory, partials per row) and an fp32 RMSNorm
    with its partials in registers compile without spilling on sm_80 and sm_90."""
    _skip_unless("cupy")
    backend = get_backend("cupy")
    jobs = []
    for spec, changes in ((NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 16384, bias=True, residual=True), {}),
                          (NormSpec("rmsnorm", "bwd", "float32", "float32", 8192), {"row_cache": "shared"})):
        config = backend.heuristic(spec).replace(prefetch=1, **changes)
        assert config.row_cache == "shared" and backend.config_cls.is_valid(spec, config) is None, config.short()
        jobs += [audit.Job("cupy", spec, config, arch) for arch in ARCHS]
    _gate(jobs)
    assert all(p.cp_async > 0 and p.global_loads_128 >= p.cp_async for p in audit.audit(jobs))


def test_cupy_backward_prefetch_fits():
    """prefetch=1 holds the next row's x and dy and the weight beside the row: at the per-thread budget is_valid
    grants each block size (16 elements up to 256 threads, 8 at 512, 4 at 1024), LayerNorm with every
    feature compiles without spilling on both architectures."""
    _skip_unless("cupy")
    from autonorm.backends.cupy_config import max_prefetch_elems

    jobs = []
    for n, threads, vec in ((4096, 256, 8), (4096, 512, 8), (4096, 1024, 4), (1128, 128, 8)):
        spec = NormSpec("layernorm", "bwd", "bfloat16", "float32", n, bias=True, residual=True)
        config = get_backend("cupy").heuristic(spec).replace(threads=threads, vec=vec, rows=1, prefetch=1)
        assert get_backend("cupy").config_cls.is_valid(spec, config) is None, config.short()
        assert -(-n // threads) >= max_prefetch_elems(threads) // 2  # near the budget, not far below it
        jobs += [audit.Job("cupy", spec, config, arch) for arch in ARCHS]
    _gate(jobs)


def test_cupy_cluster_split_fits_sm_90():
    """The thread-block cluster forward (a quarter of a 256K bf16 row a block, 128 KiB of shared memory) and
    backward (x and dy of a slice cached, dW/dB in registers at the budget's edge: 8 elements a thread for
    LayerNorm with a bias, 16 for RMSNorm) compile for sm_90 without spilling; the tuner audits them there only."""
    _skip_unless("cupy")
    backend = get_backend("cupy")
    jobs = []
    for spec, cache, partials in (
            (NormSpec("layernorm", "fwd", "bfloat16", "bfloat16", 262144, bias=True, residual=True), "cluster4", None),
            (NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 65536, bias=True, residual=True), "cluster8",
             "registers"),
            (NormSpec("rmsnorm", "bwd", "bfloat16", "float32", 131072, residual=True), "cluster8", "registers"),
            (NormSpec("layernorm", "bwd", "bfloat16", "bfloat16", 262144, bias=True), "cluster8", "global")):
        config = backend.heuristic(spec).replace(row_cache=cache, threads=1024, rows=1, unroll=1, prefetch=0)
        config = config.replace(partials=partials) if partials else config
        assert backend.config_cls.is_valid(spec, config) is None, config.short()
        jobs.append(audit.Job("cupy", spec, config, "sm_90"))
    _gate(jobs)


REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "hardware-fit.json"
REGENERATE = ("autonorm audit --grid standard --save docs/benchmarks/hardware-fit.json "
              "(about 15 minutes on 2 cores from a cold cache; only changed kernels recompile)")


def test_standard_grid_fits_per_the_saved_report():
    """The full gate: every heuristic kernel of the standard grid (fp32/fp16/bf16 x RMS/LN x fwd/bwd x
    N = 256..262,144, sm_80 and sm_90) fits, judged from the saved report of the audit that compiled
    them. Kernels are matched by what is compiled (backend, arch, rendered source, spec, config), so a
    kernel changed since the report fails here until the audit is rerun; the subset above compiles
    for real in every run."""
    report = audit.load_report(REPORT)
    jobs = audit.heuristic_jobs(STANDARD.specs(), audit.BACKENDS, ARCHS)
    stale, failures = [], []
    for job in jobs:
        p = report.get(job.identity())
        if p is None:
            stale.append(f"{job.backend} {job.arch} {job.spec.short()} {job.config.short()}")
        elif audit.gate_failures(p, job.spec):
            failures.append(f"{p.backend} {p.arch} {p.spec} {p.config}: {'; '.join(audit.gate_failures(p, job.spec))}")
    assert not stale, (f"{len(stale)} of {len(jobs)} kernels changed since {REPORT.name} was made; "
                       f"regenerate it: {REGENERATE}. First: " + "; ".join(stale[:5]))
    assert not failures, "\n".join(failures)


def test_saved_report_round_trips_and_rejects_a_corrupt_file(tmp_path):
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 4096)
    job = audit.Job("triton", spec, get_backend("triton").heuristic(spec), "sm_90")
    p = audit.Profile(backend="triton", spec=spec.short(), config=job.config.short(), arch="sm_90", kernel="k",
                      registers=40, spill_stores=4, spill_loads=4, stack=8, smem_static=0, smem_dynamic=0,
                      threads=256, global_loads=4, global_loads_128=4,
                      global_loads_64=0, global_stores=2, global_stores_128=2,
                      cp_async=0, sass_sha256="0" * 64)
    path = tmp_path / "report.json"
    audit.save_report(path, [job], [p], {"ptxas": "13.4"}, "autonorm audit --test")
    back = audit.load_report(path)[job.identity()]
    assert (back.registers, back.spill_bytes, back.threads) == (40, 8, 256)
    assert back.blocks_per_sm == audit.resident_blocks(40, 256, 0, audit.ARCHS["sm_90"])[0]  # recomputed
    assert audit.gate_failures(back, spec) == ["spills 8 bytes"]
    path.write_text(path.read_text().replace('"registers": 40', '"registers": "forty"').replace("]}", "]"))
    with pytest.raises(audit.ReportError, match="report.json"):
        audit.load_report(path)


def test_compare_names_kernels_whose_fit_or_occupancy_changed(tmp_path, capsys, monkeypatch):
    """Another compiler version, same sources: a kernel with more registers (lower occupancy) and one that
    now spills are listed; an unchanged one is not; the spilling one makes the command exit 1."""
    specs = [NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", n) for n in (1024, 4096, 8192, 16384)]
    jobs = [audit.Job("triton", s, get_backend("triton").heuristic(s), "sm_90") for s in specs]

    def profile(job, registers, spills=0):
        p = audit.Profile(backend="triton", spec=job.spec.short(), config=job.config.short(), arch="sm_90",
                          kernel="k", registers=registers, spill_stores=spills, spill_loads=spills, stack=0,
                          smem_static=0, smem_dynamic=0, threads=256, global_loads=4, global_loads_128=4,
                          global_loads_64=0, global_stores=2, global_stores_128=2, cp_async=0,
                          sass_sha256="0" * 64)
        return audit.occupancy(p, audit.ARCHS["sm_90"])

    report = tmp_path / "report.json"
    audit.save_report(report, jobs[:3], [profile(j, 32) for j in jobs[:3]], {"triton": "9.9"}, "autonorm audit")
    now = [profile(jobs[0], 32), profile(jobs[1], 40), profile(jobs[2], 32, spills=8), profile(jobs[3], 32)]
    text, lost = audit.compare(jobs, now, audit.load_report(report))
    assert lost == 1
    summary, _, head, *rows = text.splitlines()
    assert summary.startswith("3 of 4 kernels compared (1 not in the report); registers differ in 1; "
                              "occupancy lower in 1, higher in 0; 1 fit there and not here")
    assert len(rows) == 2 and "N=4096 " in rows[0] and "N=8192 " in rows[1]
    assert "32 -> 40" in rows[0] and "100% -> 75%" in rows[0] and "yes -> yes" in rows[0]
    assert "0 -> 16" in rows[1] and "yes -> no" in rows[1]

    # The command: compiles nothing here (the audit is faked), prints both toolchains, exits 1.
    monkeypatch.setattr(audit_cli, "check_backends", lambda names: None)
    monkeypatch.setattr(audit_cli, "heuristic_jobs", lambda specs, backends, archs: jobs)
    monkeypatch.setattr(audit_cli, "audit", lambda js: now)
    assert audit_cli.main(_args(grid="standard", against=str(report))) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"against {report} (triton 9.9); here: ") and "yes -> no" in out
    report.write_text("{not json")
    assert audit_cli.main(_args(grid="standard", against=str(report))) == 2
    assert "report.json" in capsys.readouterr().err


# Compiles every heuristic of the grid for real (about 15 minutes on 2 cores from a cold cache, over the
# test tier's budget), so it runs only when asked:
#     AUTONORM_TEST_FULL_AUDIT=1 python -m pytest tests/test_audit.py -m slow
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("AUTONORM_TEST_FULL_AUDIT"), reason="set AUTONORM_TEST_FULL_AUDIT=1 (~15 min)")
@pytest.mark.parametrize("backend", audit.BACKENDS)
def test_heuristics_fit_standard_grid(backend):
    _skip_unless(backend)
    _gate(audit.heuristic_jobs(STANDARD.specs(), [backend], ARCHS))


@pytest.mark.parametrize("path", sorted(TUNING_DB.glob("*.json")), ids=lambda p: p.name)
def test_shipped_database_records_fit(path):
    backends = [b for b in audit.BACKENDS if not _missing(b)]
    _gate(audit.database_jobs(path, ARCHS, backends))


def _ptx_code(ptx: str) -> str:
    """The instructions of a PTX listing, without its debug information: that names the module's file,
    and Triton's cache may hold a compile of the same source from another checkout."""
    code = ptx.split("\n\t.section\t.debug", 1)[0]
    return "\n".join(line for line in code.splitlines() if not line.lstrip().startswith((".file", ".loc")))


def test_num_stages_changes_nothing():
    """A chunked (looping) backward compiled with num_stages 1 and 3 gives the same PTX, without cp.async:
    loads without a dot are not pipelined, so the knob was removed from the space."""
    _skip_unless("triton")
    spec = NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 131072)
    job = audit.Job("triton", spec, get_backend("triton").heuristic(spec), "sm_90")
    item = {"path": audit.compilers._module_file(job, "triton"), "spec": spec.to_dict(),
            "num_warps": job.config.num_warps, "cc": 90}
    items = [{**item, "options": {"num_stages": s}} for s in (1, 3)]
    ptx = [_ptx_code(r["ptx"]) for r in audit.compilers._run_worker("triton", items)]
    assert "ld.global" in ptx[0] and ptx[0] == ptx[1]
    assert "cp.async" not in ptx[0]
