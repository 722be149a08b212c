"""`autonorm render`: print the generated source of one kernel, for reading and debugging.

Works for every registered backend the same way, through
`get_backend(name).render(spec, config)`; rendering needs no GPU. The config is
the backend's heuristic for the spec unless `--config key=value,...` overrides
some of its knobs. Values are untrusted text: each is matched against the
knob's declared domain (so only a declared literal can reach a template), then
the whole config goes through `Config.from_dict` and the backend's validity
rule. Exit status 2 means the request was invalid; the message says why.
"""
from __future__ import annotations

import sys

_BOOLS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def add_arguments(parser) -> None:
    parser.add_argument("--backend", required=True, help="backend name (see `autonorm check`), e.g. triton, numba")
    parser.add_argument("--op", default="rmsnorm", choices=("rmsnorm", "layernorm"), help="the norm")
    parser.add_argument("--direction", default="fwd", choices=("fwd", "bwd"), help="forward or backward kernel")
    parser.add_argument("--dtype", default="float32",
                        help="input dtype: float32, float16, bfloat16 (or fp32/fp16/bf16)")
    parser.add_argument("--w-dtype", default=None,
                        help="weight dtype: float32 or the input dtype (default: the input dtype)")
    parser.add_argument("--hidden", type=int, required=True, help="hidden size N")
    parser.add_argument("--no-weight", action="store_true", help="no weight (and so no bias or offset)")
    parser.add_argument("--bias", action="store_true", help="LayerNorm bias")
    parser.add_argument("--residual", action="store_true", help="fused residual add (h = x + residual)")
    parser.add_argument("--offset", action="store_true", help="Gemma-style weight offset (RMSNorm)")
    parser.add_argument("--config", default=None, metavar="KEY=VALUE,...",
                        help="override knobs of the heuristic config, e.g. threads=128,items=4")


def parse_config(config_cls, base: dict, text: str | None):
    """`base` updated with `key=value,...` from `text`, each value typed against its knob's domain."""
    from ..errors import InvalidConfigError

    domain = config_cls.domain()
    values = dict(base)
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, raw = item.partition("=")
        key, raw = key.strip(), raw.strip()
        if not sep:
            raise InvalidConfigError(f"--config item {item.strip()!r} is not key=value")
        if key not in domain:
            raise InvalidConfigError(
                f"{config_cls.backend} config has no knob {key!r} (knobs: {', '.join(domain) or 'none'})")
        values[key] = _domain_value(key, raw, domain[key], config_cls.backend)
    return config_cls.from_dict(values)


def _domain_value(key: str, raw: str, allowed: tuple, backend: str):
    """The domain literal that `raw` spells; anything else (code included) is refused."""
    from ..errors import InvalidConfigError

    for value in allowed:
        if isinstance(value, bool):
            if _BOOLS.get(raw.lower()) is value:
                return value
        elif str(value) == raw:
            return value
    raise InvalidConfigError(f"{backend} config: {key}={raw!r} is not one of {list(allowed)}")


def main(args) -> int:
    from ..backends import get_backend
    from ..errors import AutonormError, BackendUnavailableError
    from ..spec import NormSpec, dtype_name
    from .args import UsageError

    try:
        x_dtype = dtype_name(args.dtype)
        w_dtype = dtype_name(args.w_dtype) if args.w_dtype else x_dtype
        spec = NormSpec(args.op, args.direction, x_dtype, w_dtype if not args.no_weight else x_dtype, args.hidden,
                        weight=not args.no_weight, bias=args.bias, residual=args.residual, offset=args.offset)
    except ValueError as exc:
        raise UsageError(f"invalid kernel: {exc}") from None
    try:
        backend = get_backend(args.backend)
        heuristic = backend.heuristic(spec)
        config = parse_config(backend.config_cls, heuristic.to_dict(), args.config) if args.config else heuristic
        source = backend.render(spec, config)
    except BackendUnavailableError as exc:
        print(f"autonorm render: error: {exc}", file=sys.stderr)
        return 1
    except (AutonormError, ValueError) as exc:  # unknown backend, bad config, config invalid for the spec
        raise UsageError(str(exc)) from None
    sys.stdout.write(source.text if source.text.endswith("\n") else source.text + "\n")
    print(f"sha256 {source.sha256}  backend {backend.name}  config {config.short()}  spec {spec.short()}",
          file=sys.stderr)
    return 0
