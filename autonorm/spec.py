"""What a kernel computes: `NormSpec`, and the dtype names shared by every layer.

A spec is pure data: it names the op, the direction, the dtypes, the hidden size
and the optional features. Everything that changes which kernel is valid is in
it (rows are not: the row count is a runtime argument, bucketed only for the
tuning database and the dispatcher).
"""
from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

OPS = ("rmsnorm", "layernorm")
DIRECTIONS = ("fwd", "bwd")

# dtype names as they appear in specs, databases and CLI flags. Their torch dtypes, `DTYPES` (name ->
# torch.dtype) and `DTYPE_NAMES` (torch.dtype -> name), are made on first use (`__getattr__` below):
# the command line parses its arguments with this module, without paying for torch's import.
DTYPE_LIST = ("float32", "float16", "bfloat16")
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                 "f32": "float32", "f16": "float16", "half": "float16", "float": "float32"}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

# Where an RMSNorm forward rounds to the input dtype (Hugging Face's conventions, as in Liger):
#   "gemma": x_hat * (offset + w) all in fp32, rounded once at the store (Gemma; torch.nn.RMSNorm);
#   "llama": x_hat rounded to the input dtype before the weight (LlamaRMSNorm: `w * x_hat.to(dtype)`);
#   "none":  x_hat and (offset + w) both rounded to the input dtype before their product.
CASTING_MODES = ("gemma", "llama", "none")
_FEATURE_FLAGS = ("weight", "bias", "residual", "offset")

# The kernel contract promises every hidden size up to this one.
MAX_HIDDEN = 1 << 20


def _torch_dtypes() -> dict:
    """`DTYPES`, made (with `DTYPE_NAMES`) on first use."""
    if "DTYPES" not in globals():
        import torch

        dtypes = {n: getattr(torch, n) for n in DTYPE_LIST}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})  # later lookups skip this
    return globals()["DTYPES"]


def __getattr__(name: str):
    if name not in ("DTYPES", "DTYPE_NAMES"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    _torch_dtypes()
    return globals()[name]


def dtype_name(dtype: torch.dtype | str) -> str:
    """Canonical name of a dtype given as a torch dtype or a (short) string."""
    torch = sys.modules.get("torch")  # a torch.dtype means torch is imported; a string never imports it
    if torch is not None and isinstance(dtype, torch.dtype):
        names = __getattr__("DTYPE_NAMES")
        if dtype not in names:
            raise TypeError(f"unsupported dtype {dtype}: autonorm supports {', '.join(DTYPE_LIST)}")
        return names[dtype]
    name = DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPE_LIST:
        raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(DTYPE_LIST)}")
    return name


def rows_bucket(rows: int) -> int:
    """Power-of-two bucket of a row count (0 and 1 share bucket 1)."""
    return 1 if rows <= 1 else 1 << (rows - 1).bit_length()


@dataclass(frozen=True)
class NormSpec:
    """One kernel's job: op, direction, dtypes, hidden size and features.

    `w_dtype` is the weight (and bias) dtype: fp32 or the input dtype. Without a
    weight it equals `x_dtype` so that equal problems have equal specs.
    `offset` is True when a Gemma-style offset is added to the weight (its value
    is a runtime scalar, not part of the spec).
    `casting_mode` (CASTING_MODES) only changes a forward RMSNorm with a weight and a 16-bit input;
    everywhere else it is normalized to "gemma", so that equal problems have equal specs.
    """

    op: str
    direction: str
    x_dtype: str
    w_dtype: str
    hidden: int
    weight: bool = True
    bias: bool = False
    residual: bool = False
    offset: bool = False
    casting_mode: str = "gemma"

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}: expected one of {OPS}")
        if self.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {self.direction!r}: expected one of {DIRECTIONS}")
        for field in ("x_dtype", "w_dtype"):
            if getattr(self, field) not in DTYPE_LIST:
                raise ValueError(f"{field}={getattr(self, field)!r}: expected one of {list(DTYPE_LIST)}")
        if self.w_dtype not in ("float32", self.x_dtype):
            raise ValueError(f"weight dtype {self.w_dtype} must be float32 or the input dtype {self.x_dtype}")
        # Exactly int: a subclass (bool among them) could render any `str()` into the generated source.
        if type(self.hidden) is not int or not 1 <= self.hidden <= MAX_HIDDEN:
            raise ValueError(f"hidden size {self.hidden!r} must be an int in [1, {MAX_HIDDEN}]")
        if self.bias and self.op != "layernorm":
            raise ValueError("bias is a LayerNorm feature; RMSNorm has none")
        if (self.bias or self.offset) and not self.weight:
            raise ValueError("bias and offset need a weight")
        if self.offset and self.op != "rmsnorm":
            raise ValueError("offset (Gemma 1 + w) is an RMSNorm feature")
        if self.casting_mode not in CASTING_MODES:
            raise ValueError(f"casting_mode={self.casting_mode!r}: expected one of {CASTING_MODES}")
        if self.casting_mode != "gemma" and self.op != "rmsnorm":
            raise ValueError("casting_mode is an RMSNorm feature")
        if self.direction == "bwd" or not self.weight or self.x_dtype == "float32":
            # The backward is the same for every mode; without a weight or in fp32 the modes compute the same.
            object.__setattr__(self, "casting_mode", "gemma")

    # Properties templates and launchers read, so that they never re-derive them.
    @property
    def is_layernorm(self) -> bool:
        return self.op == "layernorm"

    @property
    def x_itemsize(self) -> int:
        return ITEMSIZE[self.x_dtype]

    @property
    def w_itemsize(self) -> int:
        return ITEMSIZE[self.w_dtype]

    @property
    def torch_x_dtype(self) -> torch.dtype:
        return _torch_dtypes()[self.x_dtype]

    @property
    def torch_w_dtype(self) -> torch.dtype:
        return _torch_dtypes()[self.w_dtype]

    @property
    def features(self) -> str:
        """Short stable tag of the feature flags, used in database keys."""
        flags = [name for name in _FEATURE_FLAGS if getattr(self, name)]
        if self.casting_mode != "gemma":
            flags.append(f"cast_{self.casting_mode}")
        return "+".join(flags) or "none"

    @staticmethod
    def feature_kwargs(tag: str) -> dict:
        """NormSpec keyword arguments of a `features` tag ("weight+residual", "weight+cast_llama", "none")."""
        flags = set(tag.split("+")) - {"none"}
        casts = {f for f in flags if f.startswith("cast_")}
        unknown = flags - set(_FEATURE_FLAGS) - {f"cast_{m}" for m in CASTING_MODES}
        if unknown or len(casts) > 1:
            what = f"unknown feature {', '.join(sorted(unknown))}" if unknown else f"two casting modes {sorted(casts)}"
            raise ValueError(f"{what} in {tag!r}: features are {', '.join(_FEATURE_FLAGS)} joined by + "
                             f"(or none), with at most one of cast_llama, cast_none")
        kwargs = {name: name in flags for name in _FEATURE_FLAGS}
        if casts:
            kwargs["casting_mode"] = casts.pop()[len("cast_"):]
        return kwargs

    def with_direction(self, direction: str) -> "NormSpec":
        return NormSpec(**{**asdict(self), "direction": direction})

    def to_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        return f"{self.op}.{self.direction} x={self.x_dtype} w={self.w_dtype} N={self.hidden} [{self.features}]"

    def bytes_moved(self, rows: int) -> int:
        """Minimum DRAM traffic of one call (read each input once, write each output once), for GB/s reports."""
        xb, wb, n = self.x_itemsize, ITEMSIZE[self.w_dtype], self.hidden
        stats = 4 * rows * (2 if self.is_layernorm else 1)
        params = n * wb * (int(self.weight) + int(self.bias))
        if self.direction == "fwd":
            # read x, write y (+ read residual, write h)
            tensors = 2 + 2 * int(self.residual)
        else:
            # read x (or h), read dy, write dx (+ read dh)
            tensors = 3 + int(self.residual)
            params *= 2  # read weight, write dweight/dbias
        return tensors * rows * n * xb + stats + params
