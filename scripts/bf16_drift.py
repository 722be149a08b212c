"""How far a bf16 model patched with autonorm drifts from the same model on torch's norms, in training.

    python scripts/bf16_drift.py [--steps 20] [--model llama|torch-nn|both]

Two copies of one small model, same initial weights, same batches, same AdamW: one keeps its norms
(Hugging Face LlamaRMSNorm, or torch.nn.RMSNorm and torch.nn.LayerNorm), the other is
`autonorm.patch`ed. Reported: whether the first forward's logits are bit-equal, how many parameter
gradients of the first backward are bit-equal, the loss difference at each step, and how far the
parameters are apart after the last step (relative L2 over all parameters). For scale, a third copy
trains in float32 on torch's norms: how far bf16 itself moves the loss. The backend is the
dispatcher's choice (set AUTONORM_BACKEND to pick one). CPU only: the point is the arithmetic, not speed.
First, the forward alone: the share of bf16 outputs of one norm call that differ from torch's, per
hidden size (512 rows of randn input).
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform

import torch
from torch import nn

import autonorm

VOCAB, HIDDEN, ROWS, SEQ = 97, 64, 4, 16


class TorchNormsLM(nn.Module):
    """A small pre-norm language model on torch.nn's norms: RMSNorm before each MLP, LayerNorm after."""

    def __init__(self, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.blocks = nn.ModuleList(nn.ModuleDict({
            "pre": nn.RMSNorm(HIDDEN), "up": nn.Linear(HIDDEN, 4 * HIDDEN), "down": nn.Linear(4 * HIDDEN, HIDDEN),
            "post": nn.LayerNorm(HIDDEN)}) for _ in range(layers))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = b["post"](h + b["down"](torch.nn.functional.gelu(b["up"](b["pre"](h)))))
        return self.head(h)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model = LlamaForCausalLM(config)
    return model, lambda m, ids: m(input_ids=ids).logits


def _torch_nn():
    return TorchNormsLM(), lambda m, ids: m(ids)


MODELS = {"llama": _llama, "torch-nn": _torch_nn}


def _loss(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def drift(name: str, steps: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    reference, logits_of = MODELS[name]()
    reference = reference.to(torch.bfloat16)
    with torch.no_grad():  # norm weights away from 1, so the weight's rounding and gradient matter
        for module in reference.modules():
            if "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
    patched = autonorm.patch(copy.deepcopy(reference))
    fp32 = copy.deepcopy(reference).float()
    swapped = sum(isinstance(m, (autonorm.RMSNorm, autonorm.LayerNorm)) for m in patched.modules())
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (reference, patched, fp32)]
    batches = torch.Generator().manual_seed(seed + 1)
    result = {"model": name, "norms swapped": swapped, "losses": []}
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (ROWS, SEQ), generator=batches)
        outs = [logits_of(m, ids) for m in (reference, patched, fp32)]
        losses = [_loss(o, ids) for o in outs]
        for loss in losses:
            loss.backward()
        if step == 0:
            result["step-0 logits bit-equal"] = torch.equal(outs[0], outs[1])
            pairs = list(zip(reference.parameters(), patched.parameters()))
            result["step-0 grads bit-equal"] = f"{sum(torch.equal(a.grad, b.grad) for a, b in pairs)} of {len(pairs)}"
            result["step-0 max grad rel diff"] = max(
                ((a.grad.float() - b.grad.float()).norm() / a.grad.float().norm().clamp_min(1e-30)).item()
                for a, b in pairs)
        result["losses"].append(tuple(loss.item() for loss in losses))
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
    diffs = [abs(a - b) for a, b, _ in result["losses"]]
    result["max |loss diff|"] = max(diffs)
    result["max |loss diff| / loss"] = max(d / abs(a) for d, (a, _, _) in zip(diffs, result["losses"]))
    result["max |loss diff| bf16 vs fp32"] = max(abs(a - c) for a, _, c in result["losses"])
    result["first step with a loss diff"] = next((i for i, d in enumerate(diffs) if d), None)
    num = sum(((a.float() - b.float()) ** 2).sum() for a, b in zip(reference.parameters(), patched.parameters()))
    den = sum((a.float() ** 2).sum() for a in reference.parameters())
    result["final params rel L2 diff"] = (num / den).sqrt().item()
    backend = autonorm.explain("rms_norm", torch.ones(1, HIDDEN, dtype=torch.bfloat16), (HIDDEN,),
                               torch.ones(HIDDEN, dtype=torch.bfloat16)).backend
    result["backend"] = backend
    return result


def forward_mismatches(hidden=(64, 1024, 4096)) -> list[tuple[str, int, float, float]]:
    """(call, N, share of bf16 outputs unlike torch's, largest absolute difference; outputs are of order 1)."""
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in hidden:
        x = torch.randn(512, n, generator=gen).bfloat16()
        w = (torch.rand(n, generator=gen) + 0.5)
        b = torch.randn(n, generator=gen).bfloat16()
        wb = w.bfloat16()
        calls = {"rms_norm, fp32 weight": (autonorm.rms_norm(x, (n,), w), F.rms_norm(x, (n,), w)),
                 "rms_norm, bf16 weight": (autonorm.rms_norm(x, (n,), wb), F.rms_norm(x, (n,), wb)),
                 "layer_norm, bf16 weight and bias": (autonorm.layer_norm(x, (n,), wb, b),
                                                      F.layer_norm(x, (n,), wb, b))}
        for call, (ours, theirs) in calls.items():
            largest = (ours.float() - theirs.float()).abs().max().item()
            rows.append((call, n, (ours != theirs).float().mean().item(), largest))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import numpy

    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"{now:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; torch {torch.__version__}, numpy {numpy.__version__}, "
          f"autonorm {autonorm.__version__}; AUTONORM_BACKEND={os.environ.get('AUTONORM_BACKEND', '(unset)')}")
    print("\nforward, bf16 input, 512 rows: share of outputs unlike torch's (largest difference)")
    with torch.no_grad():
        for call, n, share, diff in forward_mismatches():
            print(f"  {call:<34} N={n:<5} {share:.1e} ({diff:.1e})")
    for name in (MODELS if args.model == "both" else [args.model]):
        r = drift(name, args.steps, args.seed)
        print(f"\n{name} (bf16, {r['norms swapped']} norms patched, backend {r['backend']}, {args.steps} AdamW steps):")
        for key in ("step-0 logits bit-equal", "step-0 grads bit-equal", "step-0 max grad rel diff",
                    "first step with a loss diff", "max |loss diff|", "max |loss diff| / loss",
                    "final params rel L2 diff", "max |loss diff| bf16 vs fp32"):
            value = r[key]
            print(f"  {key:<32} {value:.3g}" if isinstance(value, float) else f"  {key:<32} {value}")
        print("  step  loss (torch norms)  loss (autonorm)  autonorm - torch  fp32 - bf16 (torch norms)")
        for i, (a, b, c) in enumerate(r["losses"]):
            print(f"  {i:>4}  {a:>17.6f}  {b:>15.6f}  {b - a:>+16.2e}  {c - a:>+25.2e}")


if __name__ == "__main__":
    main()
