"""`autonorm bench`: time autonorm's dispatched kernels against torch eager and torch.compile.

Protocol (the tuner's, autonorm/measure.py): every implementation of one case is timed in the same
process, interleaved round-robin (rep r runs A, B, C in turn), after a warm-up,
on several input sets rotated so that their total size exceeds the last-level
cache; each sample is one call timed with `perf_counter_ns`; we report median,
p20 and p80. GB/s comes from `NormSpec.bytes_moved` (the minimum DRAM traffic),
and is compared with this machine's measured copy bandwidth.

The timing core (`time_interleaved`) takes plain callables and a clock, so the
tuner can reuse it. On a GPU the protocol is the tuner's (`measure.CudaTimer`):
CUDA events around each call, warm-up and repetitions sized by time, the L2
flushed before every call with a buffer twice the device's L2; implementations
are still interleaved round-robin.

Providers (what is compared) are data: `PROVIDERS` maps a name to an adapter
that builds, for one case, callables taking an input-set index. A provider whose
package is missing is skipped with a note; each provider's result on the first
input set is checked against the fp64 reference before it is timed, and a wrong
one is skipped with a note, never timed. `--grid standard|quick` takes its cases
from autonorm/grids.py; `--resume` and `--time-limit` make long grids resumable
(rows are written after every case); `--report DIR` writes the markdown tables
and PNG plots (autonorm/report.py).
"""
from __future__ import annotations

import datetime
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .measure import llc_bytes
from .report import ANCHORS, provider_of


DEFAULT_SHAPES = ("8192x4096", "65536x512")
EPS = 1e-6
SCHEMA_VERSION = 1


# --- timing core (reusable) ------------------------------------------------------------------

@dataclass
class Timing:
    median_us: float
    p20_us: float
    p80_us: float
    samples: int


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(samples_ns: list[int]) -> Timing:
    s = sorted(samples_ns)
    return Timing(statistics.median(s) / 1e3, _quantile(s, 0.2) / 1e3, _quantile(s, 0.8) / 1e3, len(s))


def cpu_clock(fn: Callable[[], object]) -> int:
    """Nanoseconds one call of `fn` takes on the host (CPU kernels are synchronous)."""
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


def time_interleaved(candidates: dict[str, Callable[[int], object]], n_sets: int, *, reps: int = 20,
                     warmup: int = 3, clock: Callable = cpu_clock) -> dict[str, Timing]:
    """Time each `candidates[name](set_index)`, round-robin over names and rotating input sets.

    Interleaving spreads machine noise (other processes, frequency changes) over
    every candidate instead of penalising whichever ran during a noisy spell.
    """
    for _ in range(warmup):
        for i, fn in enumerate(candidates.values()):
            fn(i % n_sets)
    samples: dict[str, list[int]] = {name: [] for name in candidates}
    for r in range(reps):
        for name, fn in candidates.items():
            samples[name].append(clock(lambda fn=fn, r=r: fn(r % n_sets)))
    return {name: summarize(s) for name, s in samples.items()}


# --- machine facts -----------------------------------------------------------------------

def copy_bandwidth_gbps(device: torch.device | str = "cpu", nbytes: int | None = None, reps: int = 10) -> float:
    """Measured device-memory copy bandwidth (read + write bytes per second / 1e9), median of reps.

    The tuner's probe (`measure.copy_bandwidth`), so that bench and tuning
    database divide by the same number. On a CPU the buffer is 4x the last-level
    cache so the copy streams from DRAM; on a GPU the probe's default (256 MiB,
    5x an H100's L2).
    """
    from . import measure

    device = torch.device(device)
    if nbytes is None and device.type == "cpu":
        nbytes = max(4 * llc_bytes(), 64 << 20)
    return measure.copy_bandwidth(device, nbytes=nbytes, reps=reps)


# --- cases -------------------------------------------------------------------------------

def parse_shape(text: str) -> tuple[int, int]:
    try:
        rows, hidden = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape {text!r} must look like ROWSxHIDDEN, e.g. 8192x4096") from None
    return rows, hidden


def _torch_fn(op):
    import torch.nn.functional as F

    if op == "rmsnorm":
        return lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS)
    return lambda x, w: F.layer_norm(x, (x.shape[-1],), w, None, EPS)


def make_sets(spec, rows: int, device: torch.device, n_sets: int) -> list[dict]:
    """Random-normal input sets (LayerNorm inputs off-centre), and for backward dy and fp32 stats."""
    from . import reference

    n, xd = spec.hidden, spec.torch_x_dtype
    # Drawn on the device itself: a GB-sized randn on the host would cost seconds per case.
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device)

    sets = []
    for _ in range(n_sets):
        x = (randn(rows, n) * 1.5 + (0.75 if spec.is_layernorm else 0.0)).to(xd)
        w = (randn(n) * 0.5 + 1.0).to(spec.torch_w_dtype)
        s = {"x": x, "w": w}
        if spec.direction == "bwd":
            _, _, mean, rstd = reference.forward(spec.op, x, eps=EPS, dtype=torch.float32)
            s.update(dy=randn(rows, n).to(xd), mean=mean, rstd=rstd)
        sets.append(s)
    return sets


class ProviderUnavailable(Exception):
    """A provider cannot run this case here (package missing, unsupported size or dtype)."""


def _autograd_impl(spec, sets, f) -> Callable[[int], object]:
    """A callable timing `f`'s forward (no grad) or only its backward (graphs built per set, untimed)."""
    if spec.direction == "fwd":
        def fwd(i):
            with torch.no_grad():
                return f(sets[i]["x"], sets[i]["w"])
        return fwd
    graphs = []
    for s in sets:
        xr, wr = s["x"].detach().requires_grad_(True), s["w"].detach().requires_grad_(True)
        graphs.append((f(xr, wr), xr, wr, s["dy"]))

    def bwd(i):
        # retain_graph keeps the graph for the next sample; each call computes dx and dw.
        y, xr, wr, dy = graphs[i]
        return torch.autograd.grad(y, (xr, wr), dy, retain_graph=True)
    return bwd


def _provide_autonorm(spec, sets, device):
    from . import dispatch

    key = dispatch.make_key(spec.op, spec.direction, sets[0]["x"], sets[0]["w"], None, None, 0.0)
    choice = dispatch.choice_for(key)
    kern = choice.kernel
    if spec.direction == "fwd":
        def fn(i):
            return kern(sets[i]["x"], sets[i]["w"], None, None, EPS, 0.0)
    else:
        def fn(i):
            s = sets[i]
            return kern(s["dy"], s["x"], s["w"], s["mean"] if spec.is_layernorm else None, s["rstd"], None, 0.0)
    return f"autonorm[{choice.backend}]", fn, choice


def _provide_torch(spec, sets, device):
    return "torch", _autograd_impl(spec, sets, _torch_fn(spec.op)), None


def _provide_compile(spec, sets, device):
    # One compiled graph per case: without the reset, Dynamo's recompile limit (8 shapes per code
    # object) would silently fall back to eager part-way through a grid.
    torch._dynamo.reset()
    return "torch.compile", _autograd_impl(spec, sets, torch.compile(_torch_fn(spec.op), dynamic=False)), None


def _provide_liger(spec, sets, device):
    if device.type != "cuda":
        raise ProviderUnavailable("Liger runs on GPUs only")
    try:
        if spec.op == "rmsnorm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction
            # offset 0, llama casting (fp32 rstd) and Liger's default in_place=True, as its users run it:
            # the backward writes dx into dy (in_place=False adds a zero-filled dx, a full extra write).
            def f(x, w):
                return LigerRMSNormFunction.apply(x, w, EPS, 0.0, "llama")
        else:
            from liger_kernel.ops.layer_norm import LigerLayerNormFunction
            zeros = torch.zeros(spec.hidden, device=device, dtype=spec.torch_w_dtype)
            # Liger's LayerNorm always takes a bias; a zero bias adds N elements of reads (negligible).
            def f(x, w):
                return LigerLayerNormFunction.apply(x, w, zeros, EPS)
    except ImportError as exc:
        raise ProviderUnavailable(f"liger_kernel not importable ({exc})") from None
    if spec.direction == "fwd" or spec.op != "rmsnorm":
        return "liger", _autograd_impl(spec, sets, f), None
    # In place, dy becomes dx: Liger gets dy copies of its own (the other providers' dy stays intact), and
    # the timer restores them before every timed call, untimed (`prepare`), so no call sees a decayed dy.
    own = [{**s, "dy": s["dy"].clone()} for s in sets]
    fn = _autograd_impl(spec, own, f)

    def prepare():
        for mine, shared in zip(own, sets):
            mine["dy"].copy_(shared["dy"])
    fn.prepare = prepare
    return "liger", fn, None


def _provide_quack(spec, sets, device):
    if device.type != "cuda":
        raise ProviderUnavailable("quack runs on GPUs only")
    try:
        import quack.rmsnorm as qr
    except Exception as exc:  # quack's import also loads the CuTe DSL, which can fail for other reasons
        raise ProviderUnavailable(f"quack not importable ({type(exc).__name__}: {exc})") from None
    if spec.op == "rmsnorm":
        def f(x, w):
            return qr.rmsnorm(x, w, eps=EPS)
    else:
        ln = getattr(qr, "layernorm", None)
        if ln is None:
            raise ProviderUnavailable("this quack has no layernorm in quack.rmsnorm")
        def f(x, w):
            return ln(x, w, eps=EPS)
    return "quack", _autograd_impl(spec, sets, f), None


@dataclass(frozen=True)
class Provider:
    """One implementation compared by `autonorm bench`: `build(spec, sets, device)` returns
    (impl name, callable taking an input-set index, dispatch choice or None)."""

    build: Callable
    about: str


PROVIDERS: dict[str, Provider] = {
    "autonorm": Provider(_provide_autonorm, "autonorm's dispatched kernel (tuning database or heuristic)"),
    "torch": Provider(_provide_torch, "torch eager: F.rms_norm / F.layer_norm"),
    "torch.compile": Provider(_provide_compile, "torch.compile(dynamic=False) of the eager function"),
    "liger": Provider(_provide_liger, "liger_kernel.ops LigerRMSNormFunction / LigerLayerNormFunction"),
    "quack": Provider(_provide_quack, "quack.rmsnorm.rmsnorm (CuTe DSL)"),
}


def check_providers(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; known: {', '.join(PROVIDERS)}")
    return names


def _primary(out):
    """The main output of a call: y forward, dx backward (kernels and autograd return tuples)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


CHECK_ROWS = 256  # outputs are row-wise: checking the first rows keeps the fp64 reference cheap at any size


def _reference_output(spec, s):
    from . import reference

    k = CHECK_ROWS
    if spec.direction == "fwd":
        return reference.forward(spec.op, s["x"][:k], s["w"], eps=EPS)[0]
    return reference.backward(spec.op, s["dy"][:k], s["x"][:k], s["w"], eps=EPS)[0]


def build_case(spec, rows: int, device: torch.device, n_sets: int, providers: list[str]):
    """(impls, choice, notes): callables by impl name taking an input-set index, autonorm's dispatch
    choice, and one line per provider skipped (not installed, unsupported, or wrong on this case)."""
    from . import reference

    sets = make_sets(spec, rows, device, n_sets)
    impls: dict[str, Callable[[int], object]] = {}
    notes: dict[str, str] = {}
    choice = None
    expected = None
    for name in providers:
        try:
            impl, fn, ch = PROVIDERS[name].build(spec, sets, device)
            out = _primary(fn(0))  # first call: compiles, and is the correctness check
        except ProviderUnavailable as exc:
            notes[name] = f"skipped: {exc}"
            continue
        except Exception as exc:  # an anchor that crashes on a shape is a finding, not a bench crash
            notes[name] = f"skipped: failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            continue
        if expected is None:
            expected = _reference_output(spec, sets[0])
        err = reference.rel_l2(out[:CHECK_ROWS], expected)
        tol = reference.TOLERANCES[spec.torch_x_dtype]
        if not err <= tol:  # NaN fails too
            notes[name] = f"skipped: wrong result (rel. L2 error {err:.3g} > {tol:.3g})"
            continue
        impls[impl] = fn
        if ch is not None:
            choice = ch
    return impls, choice, notes


# --- timers ------------------------------------------------------------------------------

class CpuBenchTimer:
    """Round-robin over implementations, rotating input sets (`time_interleaved`)."""

    def __init__(self, reps: int, warmup: int):
        self.reps, self.warmup = reps, warmup

    def describe(self) -> dict:
        return {"timer": "perf_counter_ns", "reps": self.reps, "warmup": self.warmup, "interleaved": True,
                "stat": "median (p20, p80)", "cache": f"rotating input sets > LLC ({llc_bytes()} B)",
                "llc_bytes": llc_bytes(), "torch_threads": torch.get_num_threads()}

    def time(self, spec, rows, impls, n_sets) -> dict[str, Timing]:
        return time_interleaved(impls, n_sets, reps=self.reps, warmup=self.warmup, clock=cpu_clock)


class CudaBenchTimer:
    """The tuner's GPU protocol (`measure.CudaTimer`): CUDA events, reps sized by time, L2 flushed
    before every call (buffer = 2x `identity(dev)["l2_bytes"]`), implementations interleaved."""

    def __init__(self, device, timer=None):
        from . import measure

        self.timer = timer if timer is not None else measure.CudaTimer(device)

    def describe(self) -> dict:
        return {**self.timer.describe(), "interleaved": True}

    def time(self, spec, rows, impls, n_sets) -> dict[str, Timing]:
        names = list(impls)
        # CudaTimer calls kernel(*args) with its own inputs; our callables bring theirs (set 0).
        kernels = [lambda *_a, f=impls[n]: f(0) for n in names]
        for kernel, name in zip(kernels, names):
            if hasattr(impls[name], "prepare"):  # untimed work before each call (measure.CudaTimer)
                kernel.prepare = impls[name].prepare
        out = self.timer.interleaved(spec, kernels, rows)
        return {n: Timing(t.median_us, t.p20_us, t.p80_us, t.reps) for n, t in zip(names, out)}


def timer_for(device: torch.device, reps: int, warmup: int):
    return CudaBenchTimer(device) if device.type == "cuda" else CpuBenchTimer(reps, warmup)


# --- the command -------------------------------------------------------------------------

def add_arguments(p) -> None:
    from .cli import add_device, add_list

    add_list(p, "--ops", default=["rmsnorm", "layernorm"], choices=["rmsnorm", "layernorm"])
    add_list(p, "--dtypes", default=["float32", "bfloat16"],
             help="input dtypes (float32, float16, bfloat16 or fp32 ...)")
    add_list(p, "--shapes", default=list(DEFAULT_SHAPES), help="ROWSxHIDDEN, e.g. 8192x4096")
    add_list(p, "--directions", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--grid", choices=["standard", "quick"],
                   help="take ops, directions, dtypes and shapes from autonorm/grids.py (overrides those options)")
    add_list(p, "--providers", default=list(PROVIDERS),
             help=f"what to compare (missing packages are skipped): {', '.join(PROVIDERS)}")
    add_list(p, "--backends", "--backend", dest="backends",
             help="force one autonorm backend (as AUTONORM_BACKEND; default: the dispatcher's choice)")
    add_device(p)
    p.add_argument("--reps", type=int, default=20, help="timed calls per implementation and case (CPU; "
                                                        "on CUDA repetitions are sized by time)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per implementation and case")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile (its compile takes minutes)")
    p.add_argument("--copy-bw", type=float, metavar="GBPS",
                   help="copy bandwidth to divide by (e.g. from an earlier probe) instead of measuring it")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON (after every case)")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json and skip their cases")
    p.add_argument("--time-limit", type=float, metavar="S",
                   help="start no new case after S seconds; exit status 3 when cases are left")
    p.add_argument("--report", metavar="DIR", help="write DIR/<device-slug>.md and PNG plots from the rows")
    p.add_argument("--input", nargs="+", metavar="JSON",
                   help="with --report: make the report from these bench JSON files, measuring nothing")
    p.add_argument("--db", metavar="PATH", help="with --report: a tuning database to summarize too")


def _n_sets(spec, rows: int, device: torch.device) -> int:
    """Input sets to rotate so that one full rotation does not fit in the last-level cache.

    On a GPU the timer flushes the L2 before every call instead, so one set suffices.
    """
    if device.type == "cuda":
        return 1
    per_set = spec.bytes_moved(rows)
    return max(1, min(8, -(-2 * llc_bytes() // max(per_set, 1))))


def cases_from_args(args):
    """[(spec, rows)] in run order."""
    from . import grids
    from .spec import NormSpec

    from .check import dtype_names
    from .cli import UsageError

    if args.grid:
        return grids.get(args.grid).bench_cases()
    try:
        shapes = [parse_shape(shape) for shape in args.shapes]
    except ValueError as exc:
        raise UsageError(f"--shapes: {exc}") from None
    out = []
    for op in args.ops:
        for direction in args.directions:
            for dname in dtype_names(args.dtypes):
                for rows, hidden in shapes:
                    try:
                        out.append((NormSpec(op, direction, dname, dname, hidden), rows))
                    except ValueError as exc:
                        raise UsageError(f"--shapes {rows}x{hidden}: {exc}") from None
    return out


def case_name(spec, rows: int) -> str:
    return f"{spec.op}.{spec.direction} {spec.x_dtype} {rows}x{spec.hidden}"


def _load_previous(path: str, slug: str) -> tuple[list, dict]:
    with open(path) as f:
        doc = json.load(f)
    from .cli import UsageError

    if doc.get("device", {}).get("slug") != slug:
        raise UsageError(f"{path} holds rows of {doc.get('device', {}).get('slug')!r}, "
                         f"not of this device ({slug}); use another --json file")
    return doc.get("rows", []), doc.get("skipped", {})


def _write(path: str, doc: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _make_report(args, json_paths: list[str]) -> None:
    from . import report

    written = report.write_report(json_paths, args.report, db_path=args.db)
    for path in written:
        print(f"wrote {path}")


def main(args) -> int:
    from . import device as device_mod
    from . import dispatch

    from .cli import UsageError, device_arg

    if args.input:
        if not args.report:
            raise UsageError("--input needs --report DIR")
        _make_report(args, args.input)
        return 0
    try:
        providers = check_providers(list(args.providers))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.no_compile and "torch.compile" in providers:
        providers.remove("torch.compile")
    if "torch" not in providers:
        providers.insert(0, "torch")  # every row's speedup_vs_torch divides by it
    if args.backends:
        if len(args.backends) > 1:
            raise UsageError(f"--backends: bench forces one autonorm backend at a time, got {', '.join(args.backends)}")
        from .check import backend_names
        os.environ["AUTONORM_BACKEND"] = backend_names(args.backends, None)[0]
        dispatch.reset()
    dev = device_arg(args.device)
    cases = cases_from_args(args)  # bad values fail here, before any probe
    ident = device_mod.identity(dev)
    started = time.monotonic()
    bw = args.copy_bw or copy_bandwidth_gbps(dev)
    timer = timer_for(dev, args.reps, args.warmup)
    rows_out, skipped = [], {}
    if args.resume and args.json and os.path.exists(args.json):
        rows_out, skipped = _load_previous(args.json, ident["slug"])
    done = {r["case"] for r in rows_out}
    print(f"# {ident['name']} ({ident['slug']}), copy bandwidth {bw:.1f} GB/s, torch threads "
          f"{torch.get_num_threads()}; {len(cases)} cases ({len(done & {case_name(s, r) for s, r in cases})} done)")
    header = (f"{'case':<42} {'impl':<20} {'median us':>10} {'p20':>9} {'p80':>9} {'GB/s':>7} {'%copy':>6} "
              f"{'x eager':>8} {'x compile':>9}")
    print(header)
    doc = {
        "schema_version": SCHEMA_VERSION,
        "device": ident,
        "versions": device_mod.software_versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_bandwidth_gbps": bw,
        "providers": providers,
        "protocol": {**timer.describe(), "load_avg": os.getloadavg()},
        "rows": rows_out,
        "skipped": skipped,
    }
    left = 0
    for spec, rows in cases:
        case = case_name(spec, rows)
        if case in done:
            continue
        if args.time_limit is not None and time.monotonic() - started > args.time_limit:
            left += 1
            continue
        n_sets = _n_sets(spec, rows, dev)
        impls, choice, notes = build_case(spec, rows, dev, n_sets, providers)
        for name, note in notes.items():
            print(f"{case:<42} {name:<20} {note}", flush=True)
        if notes:
            skipped[case] = notes
        if not impls:
            continue
        timings = timer.time(spec, rows, impls, n_sets)
        nbytes = spec.bytes_moved(rows)
        base = {name: t.median_us for name, t in timings.items()}
        anchors = [base[n] for n in base if provider_of(n) in ANCHORS]
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for name, t in timings.items():
            gbps = nbytes / (t.median_us * 1e-6) / 1e9 if t.median_us > 0 else 0.0
            row = {
                "case": case, "impl": name, "provider": provider_of(name), "spec": spec.to_dict(), "rows": rows,
                "bytes_moved": nbytes, "input_sets": n_sets, **asdict(t),
                "gbps": gbps, "pct_copy_bw": 100 * gbps / bw,
                "speedup_vs_torch": base["torch"] / t.median_us if "torch" in base else None,
                "speedup_vs_compile": (base["torch.compile"] / t.median_us if "torch.compile" in base else None),
                "speedup_vs_best_anchor": min(anchors) / t.median_us if anchors else None,
                "config": choice.config.to_dict() if name.startswith("autonorm") and choice else None,
                "rung": choice.rung if name.startswith("autonorm") and choice else None,
                "timer": "perf_counter_ns" if dev.type == "cpu" else "cuda_event",
                "device": ident["slug"], "date": date,
            }
            rows_out.append(row)
            st, sc = row["speedup_vs_torch"], row["speedup_vs_compile"]
            print(f"{case:<42} {name:<20} {t.median_us:>10.1f} {t.p20_us:>9.1f} {t.p80_us:>9.1f} "
                  f"{gbps:>7.1f} {row['pct_copy_bw']:>5.0f}% "
                  + (f"{st:>7.2f}x " if st is not None else f"{'-':>8} ")
                  + (f"{sc:>8.2f}x" if sc is not None else f"{'-':>9}"), flush=True)
        if args.json:
            _write(args.json, doc)  # after every case: a killed run keeps what it measured
    if args.json:
        _write(args.json, doc)
        print(f"wrote {len(rows_out)} rows to {args.json}")
    if args.report:
        if args.json:
            _make_report(args, [args.json])
        else:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "bench.json")
                _write(path, doc)
                _make_report(args, [path])
    if left:
        print(f"autonorm bench: time limit reached, {left} cases left (run again with --resume)")
        return 3
    return 0
