"""Train a tiny Hugging Face Llama for a few steps with autonorm's kernels, and say which ones ran.

    python examples/train_tiny_llama.py                 # CPU or the first GPU
    AUTONORM_LOG=1 python examples/train_tiny_llama.py  # also log each kernel choice as it is made
    python examples/train_tiny_llama.py --compile       # through torch.compile(fullgraph=False)

The model is built from a config (no download). `autonorm.patch` swaps its
LlamaRMSNorm layers for `autonorm.RMSNorm` in place, sharing the parameters;
the loss is checked against an unpatched copy at the first step.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

import autonorm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    args = parser.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    dtype = getattr(torch, args.dtype)
    model = LlamaForCausalLM(config).to(device=args.device, dtype=dtype)
    reference = copy.deepcopy(model)

    autonorm.patch(model)
    swapped = sum(isinstance(m, autonorm.RMSNorm) for m in model.modules())
    print(f"patched {swapped} RMSNorm layers on {args.device} ({args.dtype})")

    step_fn = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, config.vocab_size, (4, 64), device=args.device)
    for step in range(args.steps):
        start = time.perf_counter()
        loss = step_fn(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            with torch.no_grad():
                expected = reference(input_ids=ids, labels=ids).loss
            print(f"step 0 loss {loss.item():.4f} (unpatched model: {expected.item():.4f})")
        else:
            print(f"step {step} loss {loss.item():.4f} ({(time.perf_counter() - start) * 1e3:.1f} ms)")

    # The kernels this model's norms use, forward and backward, and the ladder rung that chose each.
    x = torch.randn(ids.numel(), config.hidden_size, device=args.device, dtype=dtype)
    norm = model.model.norm
    print("kernels chosen:")
    for direction in ("fwd", "bwd"):
        print("  ", autonorm.explain(norm, x, direction=direction))


if __name__ == "__main__":
    main()
