"""The Triton backend: the shared grid, the chunked path, the whole search space, the public API.

On a machine without a GPU, conftest sets TRITON_INTERPRET=1 and these run the
generated kernels in Triton's interpreter on CPU tensors; tests marked `gpu`
run the same checks (and the ones too big for the interpreter) on CUDA.
"""
import random
import re

import pytest
import torch
from grid import check_case, latin_square, params, public_api_3d

from autonorm import InvalidConfigError, verify
from autonorm.backends import get_backend
from autonorm.backends.triton import TritonConfig, next_pow2
from autonorm.spec import NormSpec

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def triton_backend():
    backend = get_backend("triton")
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    return backend


# --- correctness: the shared grid ---------------------------------------------------------

@pytest.mark.parametrize("spec,rows,strided", params())
def test_grid(triton_backend, spec, rows, strided, device):
    check_case(triton_backend, spec, rows, strided, device)


OPS_DIRECTIONS = [(op, direction) for op in ("rmsnorm", "layernorm") for direction in ("fwd", "bwd")]


# Every op and direction in the default tier, the dtypes alternating; the rest is slow (the interpreter takes
# 3-9 s a case).
@pytest.mark.parametrize("op,direction,dtype", latin_square(OPS_DIRECTIONS, [("float32",), ("bfloat16",)]))
def test_largest_hidden(triton_backend, op, direction, dtype, device):
    """N = 262144, the contract's upper size: the heuristic loops over chunks."""
    spec = NormSpec(op, direction, dtype, "float32", 262144, bias=op == "layernorm", residual=True)
    assert triton_backend.heuristic(spec).BLOCK_N < spec.hidden
    check_case(triton_backend, spec, 2, True, device)


# --- the chunked path, forced --------------------------------------------------------------

CHUNKED = [(1128, 1024), (5120, 1024), (4096, 2048), (65537, 8192)]


# Every op and direction meets one chunking in the default tier, every chunking one op and direction (the
# interpreter takes 3-15 s a case); the rest of the square is slow.
@pytest.mark.parametrize("op,direction,n,block", latin_square(OPS_DIRECTIONS, CHUNKED))
def test_chunked_path(triton_backend, n, block, op, direction, device):
    feats = {"bias": True} if op == "layernorm" else {"offset": True}
    spec = NormSpec(op, direction, "float16", "float32", n, residual=True, **feats)
    config = TritonConfig(BLOCK_N=block, num_warps=8, ROWS_PER_PROGRAM=1,
                          DW_PARTIALS=32)
    source = triton_backend.render(spec, config).text
    assert "chunked loop over the row" in source and "    CHUNKED=True," in source
    # More rows than partials, so that programs accumulate several rows into their dW partial.
    check_case(triton_backend, spec, 3 if n > 10_000 else 37, True, device, config)


# Every chunking in the default tier, the ops alternating; the rest is slow.
@pytest.mark.parametrize("op,n,block", latin_square([("rmsnorm",), ("layernorm",)], CHUNKED))
def test_chunked_backward_with_partials_on_chip(triton_backend, n, block, op, device):
    """Column chunks outside the rows: dW/dB summed on chip per program and written once."""
    feats = {"bias": True} if op == "layernorm" else {"offset": True}
    spec = NormSpec(op, "bwd", "float16", "float32", n, residual=True, **feats)
    # 8 fp32 per thread: the accumulators beside the tile stay in registers (see is_valid)
    config = TritonConfig(BLOCK_N=block, num_warps=max(4, block // 256), ROWS_PER_PROGRAM=1,
                          DW_PARTIALS=32, DW_COLUMN_OUTER=1)
    check_case(triton_backend, spec, 3 if n > 10_000 else 37, True, device, config)


@pytest.mark.parametrize("n,rows_per_program", [(123, 4), (1024, 1), (4096, 2)])
@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
def test_backward_prefetch_of_the_next_row_group(triton_backend, n, rows_per_program, op, device):
    """BWD_PREFETCH=1: each iteration loads the next row group's x and dy before its own reductions. 37 rows
    over 8 programs: programs of several groups, a partial last group and a program past the last row."""
    feats = {"bias": True} if op == "layernorm" else {"offset": True}
    spec = NormSpec(op, "bwd", "bfloat16", "float32", n, residual=True, **feats)
    configs = [TritonConfig(BLOCK_N=next_pow2(n), num_warps=w, ROWS_PER_PROGRAM=rows_per_program, DW_PARTIALS=32,
                            BWD_PREFETCH=1) for w in (1, 2, 4, 8, 16)]
    config = next(c for c in configs if TritonConfig.is_valid(spec, c) is None)  # the fewest warps that fit
    assert "    PREFETCH=True," in triton_backend.render(spec, config).text
    check_case(triton_backend, spec, 37, True, device, config)


def test_single_block_path_has_no_loop_over_columns(triton_backend):
    spec = NormSpec("layernorm", "fwd", "float32", "float32", 760)
    source = triton_backend.render(spec, triton_backend.heuristic(spec)).text
    assert "whole row on chip" in source and "    CHUNKED=False," in source


# --- configs: domain, validity, heuristic, space ---------------------------------------------

SIZES = (1, 7, 123, 760, 1128, 4096, 5120, 8192, 32768, 65536, 65537, 262144, 1 << 20)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_heuristic_is_in_a_bounded_space(n, direction):
    spec = NormSpec("rmsnorm", direction, "bfloat16", "bfloat16", n)
    space = TritonConfig.space(spec)
    assert TritonConfig.heuristic(spec) in space
    assert 1 <= len(space) <= 500, len(space)
    for config in space:
        assert config.BLOCK_N <= next_pow2(n)
        assert config.BLOCK_N * config.ROWS_PER_PROGRAM <= 65536


def test_heuristic_follows_liger_warps_below_the_register_cliff():
    configs = {n: TritonConfig.heuristic(NormSpec("rmsnorm", "fwd", "float32", "float32", n))
               for n in (4096, 16384, 65536)}
    assert {n: c.num_warps for n, c in configs.items()} == {4096: 8, 16384: 16, 65536: 16}
    # Liger's N=65536 config (one 65536 block, 32 warps) needs 64 fp32 per thread with 64 registers
    # each (1024 threads on a 64K-register SM): it spills, so the row is chunked instead.
    assert configs[65536].BLOCK_N < 65536
    small = TritonConfig.heuristic(NormSpec("rmsnorm", "fwd", "float32", "float32", 123))
    assert small.ROWS_PER_PROGRAM > 1  # several rows per program for small N


def test_invalid_configs_say_why():
    spec = NormSpec("layernorm", "fwd", "float32", "float32", 760)
    too_wide = TritonConfig(BLOCK_N=4096, num_warps=4, ROWS_PER_PROGRAM=1, DW_PARTIALS=32)
    assert "exceeds the padded row" in TritonConfig.is_valid(spec, too_wide)
    too_many_rows = too_wide.replace(BLOCK_N=1024, ROWS_PER_PROGRAM=32, num_warps=32)
    assert "ROWS_PER_PROGRAM" in TritonConfig.is_valid(spec, too_many_rows)
    spills = too_wide.replace(BLOCK_N=1024, num_warps=1, ROWS_PER_PROGRAM=4)
    assert "spill" in TritonConfig.is_valid(spec, spills)
    with pytest.raises(InvalidConfigError, match="exceeds the padded row"):
        get_backend("triton").render(spec, too_wide)
    with pytest.raises(InvalidConfigError, match="outside its domain"):
        TritonConfig.from_dict({**too_wide.to_dict(), "BLOCK_N": 1000})
    with pytest.raises(InvalidConfigError, match="unknown keys"):
        TritonConfig.from_dict({**too_wide.to_dict(), "evil": "import os"})


SPACE_SPECS = [
    NormSpec("rmsnorm", "fwd", "bfloat16", "float32", 123, residual=True, offset=True),
    NormSpec("layernorm", "bwd", "float16", "float16", 1128, bias=True),
    NormSpec("rmsnorm", "bwd", "float32", "float32", 5120, residual=True),
]


@pytest.mark.parametrize("spec", SPACE_SPECS, ids=lambda s: s.short())
def test_whole_space_renders_and_a_sample_runs(triton_backend, spec, device):
    space = triton_backend.space(spec)
    sources = {triton_backend.render(spec, config).sha256 for config in space}
    assert len(sources) == len(space)  # every knob in the space changes the generated code
    for config in random.Random(spec.hidden).sample(space, 4):
        check_case(triton_backend, spec, 9, True, device, config)


# --- generated source -------------------------------------------------------------------------

@pytest.mark.parametrize("direction", ["fwd", "bwd"])
@pytest.mark.parametrize("block", [4096, 1024])
def test_row_offsets_are_int64(triton_backend, direction, block):
    """rows * stride must be computed in int64 (rows * N may exceed 2**31 elements)."""
    spec = NormSpec("rmsnorm", direction, "float16", "float16", 4096, residual=True)
    config = triton_backend.heuristic(spec).replace(BLOCK_N=block)
    text = triton_backend.render(spec, config).text
    assert "tl.program_id(0).to(tl.int64)" in text
    assert "tl.arange(0, ROWS_PER_PROGRAM).to(tl.int64)" in text
    # Every 2-D access goes through the int64 row index (rows2, or the prefetch's next_rows = rows2 + k)
    # times the tensor's own row stride: inline, or through _load_tile, which does the same.
    assert "return tl.load(P + rows2 * stride + cols[None, :]" in text
    for tensor, stride in (("X", "stride_x"), ("DY", "stride_dy"), ("DX", "stride_dx"), ("DH", "stride_dh"),
                           ("R", "stride_r"), ("H", "stride_h"), ("Y", "stride_y")):
        accesses = re.findall(rf"(?:tl\.load\(|tl\.store\(|_load_tile\()({tensor}\b[^\n]*)", text)
        assert (len(accesses) > 0) == (f"    {tensor}, {stride}," in text), tensor
        for access in accesses:
            assert access.startswith((f"{tensor} + rows2 * {stride} ", f"{tensor}, {stride}, rows2,",
                                      f"{tensor}, {stride}, next_rows,")), access


def test_every_variant_of_a_direction_is_one_kernel_text(triton_backend):
    """Features and paths are tl.constexpr flags the kernels branch on, not template branches: every spec
    and config of a direction renders the same jit code and launcher; only the constants above them differ."""
    def code(spec, config):
        text = triton_backend.render(spec, config).text
        return text[text.index("@triton.jit"):].replace(f"_{spec.op}_", "_op_")

    for direction in ("fwd", "bwd"):
        variants = [(NormSpec("rmsnorm", direction, "bfloat16", "float32", 123), None),
                    (NormSpec("layernorm", direction, "float16", "float16", 5120, bias=True, residual=True), None),
                    (NormSpec("rmsnorm", direction, "float32", "float32", 65537, weight=False), None),
                    (NormSpec("rmsnorm", direction, "float16", "float32", 4096, offset=True, residual=True),
                     TritonConfig(BLOCK_N=1024, num_warps=8, ROWS_PER_PROGRAM=1, DW_PARTIALS=32))]
        codes = {code(spec, config or triton_backend.heuristic(spec)) for spec, config in variants}
        assert len(codes) == 1, direction


def test_scalars_stay_fp32_and_source_is_readable(triton_backend):
    spec = NormSpec("rmsnorm", "fwd", "bfloat16", "float32", 4096, offset=True)
    text = triton_backend.render(spec, triton_backend.heuristic(spec)).text
    assert "float(eps)" in text and "float(offset)" in text  # Python floats: Triton passes them as fp32
    assert "tl.float64" not in text
    compile(text, "<rendered>", "exec")  # valid Python


# --- behaviour ------------------------------------------------------------------------------------

def test_backward_is_deterministic(triton_backend, device):
    spec = NormSpec("layernorm", "bwd", "bfloat16", "float32", 760, bias=True)
    kernel = triton_backend.compile(spec, triton_backend.heuristic(spec), device)
    inputs = verify.make_inputs(spec, 300, device)
    first = kernel(*inputs.args(spec))
    second = kernel(*inputs.args(spec))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_zero_rows_return_empty_outputs(triton_backend, direction, device):
    spec = NormSpec("layernorm", direction, "float16", "float32", 96, bias=True, residual=True)
    kernel = triton_backend.compile(spec, triton_backend.heuristic(spec), device)
    outputs = kernel(*verify.make_inputs(spec, 0, device).args(spec))
    if direction == "fwd":
        y, h, mean, rstd = outputs
        assert y.shape == h.shape == (0, 96) and mean.shape == rstd.shape == (0,)
    else:
        dx, dw, db = outputs
        assert dx.shape == (0, 96)
        assert dw.dtype == torch.float32 and torch.equal(dw, torch.zeros(96, device=device))
        assert torch.equal(db, torch.zeros(96, device=device))


def test_availability_and_devices(triton_backend, monkeypatch):
    assert triton_backend.version().startswith(__import__("triton").__version__)
    if not torch.cuda.is_available():
        assert triton_backend.supports_device(torch.device("cpu"))
        monkeypatch.delenv("TRITON_INTERPRET")
        assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason()
        assert not triton_backend.supports_device(torch.device("cpu"))


# --- the public API through the Triton backend ---------------------------------------------------

@pytest.mark.parametrize("op", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_public_api_3d(use_backend, op, dtype, device):
    use_backend("triton")
    import autonorm

    fn = "rms_norm" if op == "rmsnorm" else "layer_norm"
    assert autonorm.explain(fn, torch.empty(2, 96, dtype=dtype, device=device), (96,)).backend == "triton"
    from autonorm.reference import tolerance
    assert public_api_3d(op, dtype, device) <= tolerance(dtype)


def test_public_api_residual_offset_and_zero_rows(use_backend, device):
    use_backend("triton")
    import autonorm
    from autonorm import reference

    x = torch.randn(3, 5, 200, device=device, requires_grad=True)
    r = torch.randn(3, 5, 200, device=device, requires_grad=True)
    w = torch.randn(200, device=device, requires_grad=True)
    y, h = autonorm.rms_norm(x, (200,), w, 1e-6, offset=1.0, residual=r)
    ry, rh, _, _ = reference.forward("rmsnorm", x.detach(), w.detach(), None, r.detach(), 1e-6, 1.0)
    assert reference.rel_l2(y, ry) < 1e-5 and reference.rel_l2(h, rh) < 1e-6
    (y.square().sum() + h.sum()).backward()
    ref_x, ref_r, ref_w = (t.detach().clone().requires_grad_(True) for t in (x, r, w))
    hh = ref_x + ref_r
    yy = hh * torch.rsqrt(hh.square().mean(-1, keepdim=True) + 1e-6) * (1.0 + ref_w)
    (yy.square().sum() + hh.sum()).backward()
    for got, want in ((x.grad, ref_x.grad), (r.grad, ref_r.grad), (w.grad, ref_w.grad)):
        assert reference.rel_l2(got, want) < 1e-5

    empty = torch.randn(0, 7, 64, device=device, requires_grad=True)
    out = autonorm.layer_norm(empty, (64,), torch.ones(64, device=device), torch.zeros(64, device=device))
    assert out.shape == (0, 7, 64)
    out.sum().backward()
    assert empty.grad.shape == (0, 7, 64)


# --- GPU tier: the full grid plus what is too big for the interpreter -----------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("spec,rows,strided", params(hidden=(1, 7, 123, 760, 1128, 4096, 5120, 8192, 16384, 32768,
                                                             65536, 65537, 131072, 262144),
                                                     feature_hidden=(123, 4096, 65537)))
def test_grid_gpu(triton_backend, spec, rows, strided):
    check_case(triton_backend, spec, max(rows, 1000) if rows else 0, strided, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["fwd", "bwd"])
def test_int64_offsets_gpu(triton_backend, direction):
    """rows * N > 2**31 elements: the last rows land past int32 offsets."""
    n, rows = 4096, (1 << 31) // 4096 + 64
    spec = NormSpec("rmsnorm", direction, "float16", "float16", n)
    kernel = triton_backend.compile(spec, triton_backend.heuristic(spec), "cuda")
    x = torch.randn(rows, n, dtype=torch.float16, device="cuda")
    w = torch.randn(n, dtype=torch.float16, device="cuda")
    tail = slice(rows - 64, rows)
    if direction == "fwd":
        y, _, _, rstd = kernel(x, w, None, None, 1e-5, 0.0)
        ry, _, _, rrstd = verify.reference.forward("rmsnorm", x[tail], w, eps=1e-5, dtype=torch.float32)
        assert verify.reference.rel_l2(y[tail], ry) < 2e-3 and verify.reference.rel_l2(rstd[tail], rrstd) < 1e-5
    else:
        rstd = torch.rsqrt(x.float().square().mean(-1) + 1e-5)
        dy = torch.randn_like(x)
        dx, dw, _ = kernel(dy, x, w, None, rstd, None, 0.0)
        rdx, _, _ = verify.reference.backward("rmsnorm", dy[tail], x[tail], w, eps=1e-5, dtype=torch.float32)
        assert verify.reference.rel_l2(dx[tail], rdx) < 2e-3
        assert torch.isfinite(dw).all()


def test_fp_fusion_is_pinned_before_the_first_launch(triton_backend, monkeypatch):
    """Triton 3.10 turns FP fusion off by default; autonorm keeps it on (settings.TRITON_FP_FUSION), and a
    value the user set wins."""
    import os

    from autonorm import settings

    spec = NormSpec("rmsnorm", "fwd", "float32", "float32", 48)
    monkeypatch.delenv("TRITON_DEFAULT_FP_FUSION", raising=False)
    triton_backend._cache.clear()
    triton_backend.compile(spec, triton_backend.heuristic(spec))
    assert os.environ["TRITON_DEFAULT_FP_FUSION"] == settings.TRITON_FP_FUSION == "1"
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "0")
    assert settings.pin_triton_fp_fusion() == "0"


def test_chunked_layernorm_variance_is_centered(triton_backend, device):
    """A large mean and a small spread: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance.

    A ramp along the row gives every chunk its own mean, so the merge of the chunks' statistics matters."""
    spec = NormSpec("layernorm", "fwd", "float32", "float32", 5000, weight=False)
    config = TritonConfig(BLOCK_N=1024, num_warps=8, ROWS_PER_PROGRAM=1, DW_PARTIALS=32)
    kernel = triton_backend.compile(spec, config, device)
    noise = 0.01 * torch.randn(3, 5000, generator=torch.Generator().manual_seed(0))
    x = (300 + torch.linspace(0, 0.1, 5000) + noise).to(device)
    _, _, mean, rstd = kernel(x, None, None, None, 1e-12, 0.0)
    exact = x.double().var(1, unbiased=False).rsqrt()
    assert torch.allclose(mean.double(), x.double().mean(1), rtol=1e-7)
    assert torch.allclose(rstd.double(), exact, rtol=1e-3)
