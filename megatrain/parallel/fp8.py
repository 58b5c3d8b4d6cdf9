"""FP8 GEMMs inside the tensor-parallel linears, on torchao's float8 casts.

torchao's ``convert_to_float8_training`` swaps ``nn.Linear`` modules; our column- and row-parallel
linears are not ``nn.Linear`` (their weights keep the canonical ND shape, their communication is
their own), so instead each chosen linear gets a :class:`Float8Gemm` that replaces its *local* GEMM
``Y_i = X_i A_i^T`` and nothing else:

- the TP collectives around it (copy / all-reduce / gather) still move bf16 activations, and the
  amax behind every scale is taken on this rank's shard only (no amax all-reduce): "scales are per
  shard", so TP=2 quantises each half of a weight with its own scale;
- the casts are torchao's (``hp_tensor_to_float8_dynamic``: amax -> scale = fp8_max / amax, optionally
  floored to a power of two, saturated cast), and the multiply is ``torch.mm`` on torchao's
  ``Float8TrainingTensor``, which runs ``torch._scaled_mm`` on Hopper/Ada and, in emulation (CPU, or
  tests), dequantises and multiplies in fp32;
- the autograd function is our own so that it saves the weight *parameter*, not a view of its
  data: under ZeRO-3 DeepSpeed frees the gathered weight after the module's forward and gathers it
  again before its backward, and a saved view would pin the full gathered weight until backward
  (torchao's function saves ``weight.t()``). The FP8 copy of the weight is not saved either: it is
  cast again in backward, as torchao does.

Which linears: only those inside transformer blocks (the head and the chunked head + loss, and the
embedding, stay bf16), whose local GEMM dims are multiples of 16 (a ``_scaled_mm`` requirement),
that ``train.fp8_exclude`` does not name, and that pass the size rule (``train.fp8_filter=auto``:
torchao's H100 thresholds per recipe, on the local shard shape, because small GEMMs lose to the
cast overhead).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

RECIPES = ("off", "tensorwise", "rowwise", "rowwise_with_gw_hp")
TORCHAO_MIN, TORCHAO_BELOW = (0, 18), (0, 19)  # the supported torchao range: >= 0.18, < 0.19
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer
DIM_MULTIPLE = 16


def _config_error(msg: str) -> Exception:
    from megatrain.config import ConfigError

    return ConfigError(msg)


def require_torchao() -> Any:
    """The torchao module, or a ConfigError that says which version to install."""
    want = f"'torchao>={'.'.join(map(str, TORCHAO_MIN))},<{'.'.join(map(str, TORCHAO_BELOW))}'"
    quiet = logging.getLogger("torchao")
    level = quiet.level
    if not torch.cuda.is_available():  # its CUDA extensions cannot load on a CPU build: say nothing of it
        quiet.setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError as e:
        raise _config_error(f"train.fp8 needs torchao ({e}); pip install {want} (or pip install "
                            f"'megatrain[fp8]')") from None
    finally:
        quiet.setLevel(level)
    found = tuple(int(p) for p in re.findall(r"\d+", torchao.__version__)[:2])
    if not TORCHAO_MIN <= found < TORCHAO_BELOW:
        raise _config_error(f"train.fp8 needs torchao in {want}, found {torchao.__version__}; "
                            f"pip install {want}")
    return torchao


def check_fp8(train: Any, device: torch.device) -> bool:
    """Start-up checks of train.fp8 against the precision and the device; returns whether FP8 is
    emulated (cast to float8, multiply in high precision). Raises ConfigError before any data loads."""
    if train.fp8 == "off":
        return False
    require_torchao()
    if train.precision == "fp16":
        raise _config_error("train.fp8 with train.precision=fp16: FP8 keeps bf16 activations and gradients "
                            "between its GEMMs; use train.precision=bf16")
    if device.type != "cuda":
        if train.precision not in ("bf16", "fp32", "auto"):
            raise _config_error(f"train.fp8 emulation runs in bf16 or fp32, not {train.precision}")
        return True  # CPU: emulation, in bf16 or (for exact tests) fp32 between the GEMMs
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        raise _config_error(f"train.fp8={train.fp8}: {torch.cuda.get_device_name(device)} has compute capability "
                            f"{cap[0]}.{cap[1]}; FP8 GEMMs need 8.9 (Ada) or 9.0 (Hopper) or newer. "
                            f"Set train.fp8=off")
    if train.precision != "bf16":
        raise _config_error(f"train.fp8={train.fp8} with train.precision={train.precision}: on a GPU FP8 needs "
                            f"train.precision=bf16 (an FP8 run is a bf16 run whose block GEMMs take FP8 operands; fp32 "
                            f"activations would double the memory traffic of every cast)")
    return False


# --------------------------------------------------------------------------- which linears


@dataclass(frozen=True)
class LinearChoice:
    """One block linear and the decision for it. ``n`` x ``k`` is the local (this TP rank's) GEMM:
    Y (tokens, n) = X (tokens, k) W^T."""

    name: str
    n: int
    k: int
    fp8: bool
    reason: str


def choose(name: str, n: int, k: int, recipe: str, rule: str, exclude: list[str]) -> LinearChoice:
    """The one rule, used by both the start report and :func:`apply_fp8`."""
    hit = next((p for p in exclude if re.search(p, name)), None)
    if hit is not None:
        return LinearChoice(name, n, k, False, f"excluded by train.fp8_exclude {hit!r}")
    if n % DIM_MULTIPLE or k % DIM_MULTIPLE:
        return LinearChoice(name, n, k, False, f"dims not multiples of {DIM_MULTIPLE}")
    if rule == "auto":
        # torchao's measured H100 break-even points (float8_linear_utils auto filter); rowwise casts
        # cost more than tensorwise ones, so its GEMMs must be larger to win
        if recipe == "tensorwise":
            small = k <= 4096 and n <= 1024
        else:
            small = n <= 2048 or k <= 1024 or (n <= 4096 and k <= 2048)
        if small:
            return LinearChoice(name, n, k, False, "too small to gain (train.fp8_filter=auto)")
    return LinearChoice(name, n, k, True, "fp8")


def block_linear_shapes(m: Any, tp: int) -> list[tuple[str, int, int]]:
    """(name within a block, local n, local k) of the four block linears, from the model config."""
    q_per_kv = m.num_heads // m.kv_heads
    return [("attn.qkv", m.kv_heads // tp * (q_per_kv + 2) * m.head_dim, m.hidden_size),
            ("attn.o", m.hidden_size, m.num_heads * m.head_dim // tp),
            ("mlp.gate_up", 2 * m.ffn_size // tp, m.hidden_size),
            ("mlp.down", m.hidden_size, m.ffn_size // tp)]


def plan_fp8(m: Any, tp: int, train: Any) -> list[LinearChoice]:
    """Every block linear of the model (canonical names ``blocks.<i>.attn.qkv`` ...) and its decision."""
    return [choose(f"blocks.{i}.{sub}", n, k, train.fp8, train.fp8_filter, train.fp8_exclude)
            for i in range(m.num_layers) for sub, n, k in block_linear_shapes(m, tp)]


def fp8_compiles(train: Any, device_type: str) -> bool:
    """Whether FP8 turns torch.compile of the blocks on: on a GPU, yes. In eager mode each cast is
    four or five separate kernels over the whole activation (abs, amax, scale, multiply, saturate,
    convert, and a transposed copy for the backward GEMMs), bandwidth-bound work that eats what the
    FP8 GEMM saves; Inductor fuses them into one or two kernels next to the norm that produces the
    input. Emulation (CPU) gains nothing from compile, so it stays eager there."""
    return getattr(train, "fp8", "off") != "off" and device_type == "cuda"


def describe_plan(choices: list[LinearChoice], recipe: str, compile_on: Optional[bool]) -> str:
    """One report line: how many linears run in FP8, which kinds, and why the others do not."""
    if recipe == "off":
        return "fp8: off"
    chosen = [c for c in choices if c.fp8]
    kinds: dict[str, list[LinearChoice]] = {}
    for c in choices:
        kinds.setdefault(c.name.split(".", 2)[2], []).append(c)
    parts = []
    for sub, cs in kinds.items():
        on = sum(c.fp8 for c in cs)
        state = "fp8" if on == len(cs) else f"bf16 ({cs[-1].reason})" if not on else f"fp8 in {on}/{len(cs)}"
        parts.append(f"{sub} {cs[0].n}x{cs[0].k} {state}")
    excluded = [c.name for c in choices if c.reason.startswith("excluded")]
    tail = (f"; excluded by train.fp8_exclude: {', '.join(excluded[:6])}{' ...' if len(excluded) > 6 else ''}"
            if excluded else "")
    shapes = ", ".join(parts)
    comp = {None: "", True: "; torch.compile on (FP8 needs its casts fused)",
            False: "; no GPU here: emulated and eager (on a GPU FP8 turns torch.compile on)"}[compile_on]
    return (f"fp8: {recipe}, {len(chosen)} of {len(choices)} block linears (local n x k: {shapes}{tail}); "
            f"head, loss and embedding stay in the run precision, as does communication; scales per TP shard{comp}")


# --------------------------------------------------------------------------- the GEMM


@dataclass(frozen=True)
class Float8Gemm:
    """The local FP8 GEMM of one linear: torchao's recipe config and matmul config (emulated or not)."""

    config: Any  # torchao.float8.Float8LinearConfig
    mm_config: Any  # torchao.float8.float8_training_tensor.LinearMMConfig

    @classmethod
    def build(cls, recipe: str, emulate: bool) -> "Float8Gemm":
        import dataclasses

        require_torchao()
        from torchao.float8.config import Float8LinearConfig
        from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig

        config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
        mm = [ScaledMMConfig(emulate, g.use_fast_accum, False, config.pad_inner_dim)
              for g in (config.gemm_config_output, config.gemm_config_grad_input, config.gemm_config_grad_weight)]
        return cls(config, LinearMMConfig(*mm))

    def __call__(self, x: torch.Tensor, weight: nn.Parameter) -> torch.Tensor:
        """x (..., K) and a weight of any shape (*out, K) -> (..., prod(out))."""
        return _Float8Matmul.apply(x, weight, self.config, self.mm_config)


def _cast(t: torch.Tensor, cast_cfg: Any, mm_config: Any, role: Any, dim: int, pow2: bool) -> torch.Tensor:
    """``t`` as a Float8TrainingTensor per ``cast_cfg`` (amax per tensor, or per row along ``dim``),
    or ``t`` itself where the recipe keeps this operand in high precision."""
    from torchao.float8.config import ScalingGranularity, ScalingType
    from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic

    if cast_cfg.scaling_type is ScalingType.DISABLED:
        return t
    axis = dim if cast_cfg.scaling_granularity is ScalingGranularity.AXISWISE else None
    return hp_tensor_to_float8_dynamic(t, cast_cfg.target_dtype, mm_config, gemm_input_role=role,
                                       scaling_granularity=cast_cfg.scaling_granularity, axiswise_dim=axis,
                                       round_scales_to_power_of_2=pow2)


@torch._dynamo.allow_in_graph
class _Float8Matmul(torch.autograd.Function):
    """Y = X W^T with all three GEMMs (Y, dX, dW) on FP8 operands as the recipe says.

    Forward casts X (rows = tokens, scaled along K) and W (scaled along K); dX = dY W casts dY along
    N and W along N; dW = dY^T X casts dY and X along the token axis. Saved: X and the parameter W."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: nn.Parameter, config: Any, mm_config: Any) -> torch.Tensor:
        from torchao.float8.float8_training_tensor import GemmInputRole

        ctx.save_for_backward(x, weight)  # the parameter object: ZeRO-3 re-gathers it before backward
        ctx.config, ctx.mm_config = config, mm_config
        k = x.shape[-1]
        x2 = x.reshape(-1, k)  # (M, K)
        w_t = weight.reshape(-1, k).t()  # (K, N)
        pow2 = config.round_scales_to_power_of_2
        xq = _cast(x2, config.cast_config_input, mm_config, GemmInputRole.INPUT, -1, pow2)
        wq = _cast(w_t, config.cast_config_weight, mm_config, GemmInputRole.WEIGHT, 0, pow2)
        y = torch.mm(xq, wq)  # (M, N)
        return y.reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple:
        from torchao.float8.float8_training_tensor import GemmInputRole

        x, weight = ctx.saved_tensors
        c, mm, pow2 = ctx.config, ctx.mm_config, ctx.config.round_scales_to_power_of_2
        k = x.shape[-1]
        g2 = grad.reshape(-1, grad.shape[-1])  # (M, N)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w_t = weight.reshape(-1, k).t()  # (K, N)
            gq = _cast(g2, c.cast_config_grad_output, mm, GemmInputRole.GRAD_OUTPUT, -1, pow2)
            wq = _cast(w_t, c.cast_config_weight_for_grad_input, mm, GemmInputRole.WEIGHT, -1, pow2)
            dx = torch.mm(gq, wq.t()).reshape(x.shape)  # (M, K)
        if ctx.needs_input_grad[1]:
            gq = _cast(g2, c.cast_config_grad_output_for_grad_weight, mm, GemmInputRole.GRAD_OUTPUT, 0, pow2)
            xq = _cast(x.reshape(-1, k), c.cast_config_input_for_grad_weight, mm, GemmInputRole.INPUT, 0, pow2)
            dw = torch.mm(gq.t(), xq).reshape(weight.shape)  # (N, K) viewed as the canonical local shape
        return dx, dw, None, None
