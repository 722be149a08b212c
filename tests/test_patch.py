"""autonorm.patch on torch.nn norms and on tiny Hugging Face Llama / Gemma / Qwen3 models built from configs."""
import warnings

import pytest
import torch
from torch import nn

import autonorm

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _torch_backend(use_backend):
    use_backend("torch")  # patch() is under test, not a backend (backends pass their own grids)


def _tiny(config_cls, model_cls, **extra):
    torch.manual_seed(0)
    config = config_cls(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=64,
                        **extra)
    model = model_cls(config).float().eval()
    with torch.no_grad():  # non-trivial norm weights, so a dropped weight or offset shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.2, 0.3)
    return model


def _logits_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.float().square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check_patched_model(model):
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    norm_classes = {type(m).__name__ for m in model.modules() if type(m).__name__.endswith("RMSNorm")}
    assert norm_classes, "the tiny model has no RMSNorm to patch"
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    expected_logits, expected_grads = _logits_and_grads(model, ids)

    assert autonorm.patch(model) is model
    assert not any(type(m).__name__ in norm_classes for m in model.modules())
    assert sum(isinstance(m, autonorm.RMSNorm) for m in model.modules()) >= 5
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # the same Parameter objects

    logits, grads = _logits_and_grads(model, ids)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert grads.keys() == expected_grads.keys() and len(grads) == len(params)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
    return model


def test_patch_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = _check_patched_model(_tiny(LlamaConfig, LlamaForCausalLM))
    norms = [m for m in model.modules() if isinstance(m, autonorm.RMSNorm)]
    assert all(m.offset == 0.0 and m.casting_mode == "llama" for m in norms)


def test_patch_gemma_offset():
    from transformers import GemmaConfig, GemmaForCausalLM

    model = _check_patched_model(_tiny(GemmaConfig, GemmaForCausalLM))
    norms = [m for m in model.modules() if isinstance(m, autonorm.RMSNorm)]
    assert all(m.offset == 1.0 and m.casting_mode == "gemma" for m in norms)


def test_patch_qwen3_head_norms():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    model = _check_patched_model(_tiny(Qwen3Config, Qwen3ForCausalLM))
    assert isinstance(model.model.layers[0].self_attn.q_norm, autonorm.RMSNorm)  # over head_dim, not hidden
    assert model.model.layers[0].self_attn.q_norm.casting_mode == "llama"


# Hugging Face parity in 16-bit: LlamaRMSNorm rounds x_hat to the input dtype before the weight; the
# patched model picks casting_mode "llama" and must give the same logits bit for bit. Without a GPU,
# Triton runs in its interpreter and Numba CUDA ("numba") in its simulator. The interpreter case is
# fp16: its fp32 -> bf16 casts truncate instead of rounding to nearest (Triton on a GPU, and fp16 in
# the interpreter, round to nearest), so no bf16 kernel can match HF there; the bf16 Triton and CuPy
# cases run on a GPU (the gpu tier: scripts/gpu_tests.sh).
@pytest.mark.parametrize("backend, dtype", [("torch", torch.bfloat16), ("numba-cpu", torch.bfloat16),
                                            pytest.param("triton", torch.float16, marks=pytest.mark.slow),
                                            pytest.param("numba", torch.bfloat16, marks=pytest.mark.slow),
                                            pytest.param("triton", torch.bfloat16, marks=pytest.mark.gpu),
                                            pytest.param("cupy", torch.bfloat16, marks=pytest.mark.gpu)])
def test_patched_llama_logits_equal_hugging_face(use_backend, backend, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    if backend != "torch":
        pytest.importorskip({"numba": "numba.cuda", "numba-cpu": "numba"}.get(backend, backend))
    use_backend(backend)
    device = "cuda" if torch.cuda.is_available() and backend in ("triton", "numba", "cupy") else "cpu"
    model = _tiny(LlamaConfig, LlamaForCausalLM).to(device=device, dtype=dtype)
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        autonorm.patch(model)
        logits = model(input_ids=ids).logits
    norms = [m for m in model.modules() if isinstance(m, autonorm.RMSNorm)]
    assert norms and all(m.casting_mode == "llama" for m in norms)
    assert autonorm.explain(norms[0], torch.ones(1, 48, dtype=dtype, device=device)).backend == backend
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("mode", ["gemma", "llama", "none"])
def test_casting_modes_against_their_definitions(mode):
    x = torch.randn(8, 48, generator=torch.Generator().manual_seed(2)).bfloat16()
    w = torch.randn(48, generator=torch.Generator().manual_seed(3)) * 0.3 + 0.2  # an fp32 weight
    y = autonorm.rms_norm(x, (48,), w, 1e-6, offset=1.0, casting_mode=mode)
    h = x.float()
    x_hat = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    scale = w + 1.0
    if mode != "gemma":
        x_hat = x_hat.bfloat16().float()
    if mode == "none":
        scale = scale.bfloat16().float()
    assert torch.equal(y, (x_hat * scale).bfloat16())
    with pytest.raises(ValueError, match="casting_mode"):
        autonorm.rms_norm(x, (48,), w, casting_mode="fp32")


class LookAlikeRMSNorm(nn.Module):
    """Named like an RMSNorm, computes something else: must be left alone."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = 1e-6

    def forward(self, x):
        return x * self.weight


def test_torch_nn_norms_and_state_dict_round_trip():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(16, 16), nn.RMSNorm(16, eps=1e-5), nn.LayerNorm(16),
                          nn.LayerNorm(16, bias=False), nn.LayerNorm(16, elementwise_affine=False),
                          LookAlikeRMSNorm(16))
    with torch.no_grad():
        model[1].weight.normal_()
        model[2].weight.normal_()
        model[2].bias.normal_()
    x = torch.randn(5, 16)
    expected = model(x)
    reference_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="LookAlikeRMSNorm"):
        autonorm.patch(model)
    assert [type(m) for m in model][1:5] == [autonorm.RMSNorm] + [autonorm.LayerNorm] * 3
    assert type(model[5]) is LookAlikeRMSNorm
    torch.testing.assert_close(model(x), expected)
    # autonorm modules load torch.nn's state dict and torch.nn modules load theirs, strictly.
    fresh = nn.Sequential(nn.Linear(16, 16), autonorm.RMSNorm(16, eps=1e-5), autonorm.LayerNorm(16),
                          autonorm.LayerNorm(16, bias=False), autonorm.LayerNorm(16, elementwise_affine=False),
                          LookAlikeRMSNorm(16))
    fresh.load_state_dict(reference_state, strict=True)
    torch.testing.assert_close(fresh(x), expected)
    back = nn.Sequential(nn.Linear(16, 16), nn.RMSNorm(16, eps=1e-5), nn.LayerNorm(16),
                         nn.LayerNorm(16, bias=False), nn.LayerNorm(16, elementwise_affine=False),
                         LookAlikeRMSNorm(16))
    back.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(back(x), expected)


def test_patch_options_and_single_module():
    model = nn.Sequential(nn.RMSNorm(8), nn.LayerNorm(8))
    autonorm.patch(model, layer_norm=False)
    assert type(model[0]) is autonorm.RMSNorm and type(model[1]) is nn.LayerNorm
    norm = nn.LayerNorm(8)
    swapped = autonorm.patch(norm)
    assert type(swapped) is autonorm.LayerNorm and swapped.weight is norm.weight
    shared = nn.RMSNorm(8)
    tied = nn.Sequential(shared, nn.Sequential(shared))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        autonorm.patch(tied)
    assert tied[0] is tied[1][0]  # a norm used twice stays one module


def test_casting_mode_is_a_spec_feature():
    from autonorm.db import RecordKey
    from autonorm.spec import NormSpec

    llama = NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 64, casting_mode="llama")
    assert llama.features == "weight+cast_llama" and llama != NormSpec("rmsnorm", "fwd", "bfloat16", "bfloat16", 64)
    assert RecordKey.of(llama, 64).spec() == llama  # database keys keep it
    # Where the modes compute the same, the spec is the plain one (one kernel, one database record).
    assert NormSpec("rmsnorm", "fwd", "float32", "float32", 64, casting_mode="llama").features == "weight"
    assert NormSpec("rmsnorm", "bwd", "bfloat16", "bfloat16", 64, casting_mode="llama").casting_mode == "gemma"
    with pytest.raises(ValueError, match="RMSNorm"):
        NormSpec("layernorm", "fwd", "bfloat16", "bfloat16", 64, casting_mode="llama")
    with pytest.raises(ValueError, match="cast_bogus"):
        NormSpec.feature_kwargs("weight+cast_bogus")
