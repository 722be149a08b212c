"""The grids `autonorm tune` searches by default and with `--quick`: plain data, so that the command line's
`--help` states them without importing torch or Optuna."""

# --quick: five studies that finish in a few minutes on a 2-core CPU (numba-cpu + torch): the forward of
# each op and hidden size, and the backward of the first op at the first hidden size ("quick_backward").
QUICK = {"ops": ["rmsnorm", "layernorm"], "directions": ["fwd"], "dtypes": ["float32"], "hidden": [1024, 4096],
         "rows": [1024], "trials": 12, "time_budget": 45.0, "quick_backward": True}
DEFAULTS = {"ops": ["rmsnorm", "layernorm"], "directions": ["fwd", "bwd"], "dtypes": ["float32", "float16", "bfloat16"],
            "hidden": [768, 1024, 2048, 4096, 5120, 8192], "rows": [1, 64, 1024, 4096, 16384], "trials": 60,
            "time_budget": 300.0}
# Features tuned unless told otherwise: what torch.nn.RMSNorm and torch.nn.LayerNorm use by default.
DEFAULT_FEATURES = {"rmsnorm": "weight", "layernorm": "weight+bias"}
