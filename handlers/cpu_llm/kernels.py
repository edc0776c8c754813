"""The only importer of the compiled kernels (kernels/csrc): torch ops, their reference twins,
and which of the two this host runs.

The kernels are registered as torch ops (`torch.ops.cpu_llm.*`) with fake implementations, so
they can sit inside compiled graphs. Each has a plain PyTorch twin computing the same formula;
it is what the kernels are tested against, and what serves only when a config opts into it
(`quantization.allow_reference_kernels`): it is 10-20x slower than fp32.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config.serving import HANDLER_SECTION, KERNEL_ISA_ALIASES, kernel_isa_name
from .core.errors import ConfigError
from .formats.quantlib import PackedWeight

try:
    import cpu_llm_kernels as _kernels
except ImportError:  # not built (no compiler at install time, or built for another torch)
    _kernels = None

# CPU_LLM_ISA=avx2 (or the config's handler.kernel_isa) runs the kernels on AVX2 on a CPU that has
# more, so one machine can serve, test and benchmark every path (the best one the CPU has otherwise).
ISA_ENV = "CPU_LLM_ISA"
ISA_KEY = f"{HANDLER_SECTION}.kernel_isa"


def _run_on(raw: str, key: str, source: str) -> str:
    """Run the kernels on `raw` (a name or alias); one this CPU cannot run is an error naming `key`."""
    wanted = kernel_isa_name(raw)
    available = list(_kernels.supported_isas())
    if wanted not in available:
        raise ConfigError(key, f"{raw!r} is not an instruction set our kernels run on this CPU "
                          f"(it runs: {', '.join(available) or 'none'}; aliases: {', '.join(KERNEL_ISA_ALIASES)})",
                          source=source)
    _kernels.set_isa(wanted)
    return wanted


def _forced_isa() -> str | None:
    """Apply CPU_LLM_ISA once, at import."""
    raw = os.environ.get(ISA_ENV, "").strip()
    if not raw or _kernels is None:
        return None
    return _run_on(raw, ISA_ENV, "environment")


FORCED_ISA = _forced_isa()  # what CPU_LLM_ISA forced (None: unset); it wins over the config
_forced_by = ISA_ENV if FORCED_ISA else None  # what chose a lower ISA than the best, for kernel_status()


def use_isa(setting: str) -> None:
    """Apply the config's `handler.kernel_isa`, once at load: "auto" runs the best ISA, another
    name that one. CPU_LLM_ISA, when set, overrides it (kernel_status() says which applied)."""
    global _forced_by
    if _kernels is None or FORCED_ISA or not _kernels.supported_isas():
        return
    if setting == "auto":
        _kernels.set_isa(_kernels.supported_isas()[0])
        _forced_by = None
        return
    _run_on(setting, ISA_KEY, "model-config.yaml")
    _forced_by = ISA_KEY if _kernels.isa() != _kernels.supported_isas()[0] else None


def _op(name: str):
    """The default overload of torch.ops.cpu_llm.<name>, looked up once: the lookup through
    torch.ops costs about a microsecond per call, and a decode step makes hundreds of calls."""
    return getattr(torch.ops.cpu_llm, name).default if _kernels is not None else None


_QLINEAR, _QLINEAR_TILED, _WOQ_LINEAR_F32, _DEQUANTIZE_INTO, _LINEAR_F32, _LINEAR_F32_CAT = (
    _op("qlinear"), _op("qlinear_tiled"), _op("woq_linear_f32"), _op("dequantize_into"), _op("linear_f32"),
    _op("linear_f32_cat"))
_SLOT_ATTENTION, _RMS_NORM, _ADD_RMS_NORM_, _SILU_MUL = (
    _op("slot_attention"), _op("rms_norm"), _op("add_rms_norm_"), _op("silu_mul"))
BLOCK = 32  # activations are quantized in blocks of 32 values (kernels/csrc/isa.h)
BUILD_COMMAND = ("make install STACK=<stack> "
                 "(or: pip install --no-build-isolation --force-reinstall --no-deps ./kernels)")


def kernels_available() -> bool:
    """True when the compiled kernels import and this CPU has one of their instruction sets."""
    return _kernels is not None and bool(_kernels.supported_isas())


def kernel_status() -> str:
    """Which implementation the quantized layers run on this host, in words."""
    if _kernels is None:
        return f"reference (cpu_llm_kernels not importable; build them: {BUILD_COMMAND})"
    if not _kernels.supported_isas():
        return "reference (the CPU lacks AVX2/FMA/F16C)"
    forced = f", forced by {_forced_by}" if _forced_by else ""
    return f"cpu_llm_kernels ({_kernels.isa()}{forced})"


def supported_isas() -> list[str]:
    """Instruction sets the kernels can run here, best first (tests run each); with CPU_LLM_ISA,
    the forced one and those below it."""
    isas = list(_kernels.supported_isas()) if _kernels is not None else []
    return isas[isas.index(FORCED_ISA):] if FORCED_ISA else isas


def set_isa(name: str) -> None:
    """Run the kernels on `name` (one of supported_isas()); tests use it to cover every path."""
    _kernels.set_isa(name)


def current_isa() -> str:
    return _kernels.isa() if _kernels is not None else "none"


if _kernels is not None:
    @torch.library.register_fake("cpu_llm::qlinear")
    def _(x, qweight, scales, offsets, bits, zero, act_per_row, bias):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("cpu_llm::qlinear_tiled")
    def _(x, tiles, scales, bits, n, act_per_row, bias):
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("cpu_llm::woq_linear_f32")
    def _(x, qweight, scales, offsets, bits, zero, bias):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("cpu_llm::linear_f32")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("cpu_llm::linear_f32_cat")
    def _(x, weights, bias):
        return x.new_empty(x.shape[0], sum(w.shape[0] for w in weights))

    @torch.library.register_fake("cpu_llm::rms_norm")
    def _(x, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("cpu_llm::add_rms_norm_")
    def _(x, delta, weight, eps):
        return torch.empty_like(x)

    @torch.library.register_fake("cpu_llm::silu_mul")
    def _(gate_up):
        return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)

    @torch.library.register_fake("cpu_llm::slot_attention")
    def _(qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads, scale):
        return qkv.new_empty(qkv.shape[0], heads * k_cache.shape[-1])


# --- the decoder stack (kernels/csrc/decoder.cpp) ---------------------------------------------

# Which op the stack calls for a projection; each layer module says which it calls (stack_linear).
STACK_TILED, STACK_ROWS, STACK_WOQ_F32, STACK_F32, STACK_BLAS = range(5)


@dataclass(frozen=True)
class StackLinear:
    """One projection as the decoder stack calls it: the op a layer's forward calls for 2-D float32
    inputs of up to `max_rows` rows, with the same tensors (held, not copied)."""

    kind: int
    tensors: tuple[torch.Tensor, ...]
    bias: torch.Tensor | None = None
    bits: int = 0
    n: int = 0
    zero: float = 0.0
    act_per_row: bool = False
    max_rows: int = sys.maxsize


def decoder_stack(heads: int, kv_heads: int, scale: float, eps: float,
                  layers: list[tuple[torch.Tensor, torch.Tensor, list[StackLinear]]]):
    """A torch.classes.cpu_llm.DecoderStack running `layers` (input norm, post-attention norm,
    [qkv, o, gate_up, down]) in one call per forward."""
    stack = torch.classes.cpu_llm.DecoderStack(heads, kv_heads, scale, eps)
    for input_norm, post_norm, linears in layers:
        stack.add_layer(input_norm, post_norm)
        for which, lin in enumerate(linears):
            stack.set_linear(which, lin.kind, list(lin.tensors), lin.bias, lin.bits, lin.n, lin.zero, lin.act_per_row)
    return stack


# --- reference twins -------------------------------------------------------------------------

def quantize_activations(x: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The float values int8 activations stand for: symmetric, one scale per block of 32 (or per
    row), rounded half to even, as the kernels do."""
    m, k = x.shape
    blocks = x.reshape(m, k // BLOCK, BLOCK)
    amax = (x.abs().amax(-1)[:, None, None].expand(m, k // BLOCK, 1) if per_row
            else blocks.abs().amax(-1, keepdim=True))
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (torch.round(blocks * (1 / scale)) * scale).reshape(m, k)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias


# --- the ops ---------------------------------------------------------------------------------

def qlinear(x: torch.Tensor, w: PackedWeight, act_per_row: bool, bias: torch.Tensor | None,
            use_kernel: bool) -> torch.Tensor:
    """x [M, K] float32 @ w.T with x quantized to int8 on the fly: integer dot products."""
    if use_kernel:
        return _QLINEAR(x, w.qweight, w.scales, w.offsets, w.bits, w.zero, act_per_row, bias)
    return _add_bias(quantize_activations(x, act_per_row) @ w.dequantize().T, bias)


def qlinear_2d(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, bits: int,
               zero: float, act_per_row: bool, bias: torch.Tensor | None) -> torch.Tensor:
    """qlinear on the kernels with the weight's tensors passed as they are (the runner's hot path:
    x float32 (M, K) contiguous, no PackedWeight built per call)."""
    return _QLINEAR(x, qweight, scales, offsets, bits, zero, act_per_row, bias)


def qlinear_tiled(x: torch.Tensor, tiles: torch.Tensor, scales: torch.Tensor, bits: int, n: int, act_per_row: bool,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """qlinear for a weight in the tiled layout (formats/tiling.py); x float32 (M, K) contiguous."""
    return _QLINEAR_TILED(x, tiles, scales, bits, n, act_per_row, bias)


def woq_linear_f32(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, use_kernel: bool) -> torch.Tensor:
    """x [M, K] float32 @ w.T with the weight dequantized in registers, fp32 throughout."""
    if use_kernel:
        return _WOQ_LINEAR_F32(x, w.qweight, w.scales, w.offsets, w.bits, w.zero, bias)
    return F.linear(x, w.dequantize(), bias)


_scratch = torch.empty(0)  # reused dequantization buffer, grown to the largest layer


def dequantize_shared(w: PackedWeight, use_kernel: bool) -> torch.Tensor:
    """The float32 weight in a buffer shared by all layers, valid until the next call. A fresh
    1-400 MB buffer per call costs more in page faults than the dequantization itself; the
    worker runs one forward at a time and each layer consumes its weight before the next."""
    global _scratch
    if not use_kernel:
        return w.dequantize()
    n, k = w.shape
    if _scratch.numel() < n * k:
        _scratch = torch.empty(n * k)
    out = _scratch[:n * k]
    _DEQUANTIZE_INTO(w.qweight, w.scales, w.offsets, w.bits, w.zero, out)
    return out.view(n, k)


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight.T in fp32 with our matrix-vector kernel (decode on hosts whose BLAS is slow)."""
    return _LINEAR_F32(x, weight, bias)


def linear_f32_cat(x: torch.Tensor, weights: list[torch.Tensor], bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ cat(weights).T in fp32 without concatenating the weights (see FullPrecisionGroup)."""
    return _LINEAR_F32_CAT(x, weights, bias)


def slot_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int,
                   scale: float) -> torch.Tensor:
    """Rotary embedding, KV-cache write and attention for N tokens, each at its own (slot,
    position); see kernels/csrc/attention.cpp. qkv (N, (heads + 2 kv_heads) * D) -> (N, heads * D)."""
    return _SLOT_ATTENTION(qkv, cos, sin, positions, slots, k_cache, v_cache, heads, kv_heads, scale)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, heads, D) rotated as Hugging Face's rotate_half does; cos/sin (N, D / 2)."""
    a, b = x.chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def slot_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                             slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
                             kv_heads: int, scale: float) -> torch.Tensor:
    """The same formula in plain PyTorch, one token at a time (tests)."""
    n, d = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.view(n, heads + 2 * kv_heads, d).split([heads, kv_heads, kv_heads], dim=1)
    q = _rotate(q, cos[positions], sin[positions])  # (N, heads, D)
    k_cache[slots, :, positions] = _rotate(k, cos[positions], sin[positions])
    v_cache[slots, :, positions] = v
    out = []
    for i in range(n):
        keys = k_cache[slots[i], :, : positions[i] + 1].repeat_interleave(heads // kv_heads, 0)  # (heads, T, D)
        values = v_cache[slots[i], :, : positions[i] + 1].repeat_interleave(heads // kv_heads, 0)
        weights = torch.softmax((keys @ q[i][:, :, None]).squeeze(-1) * scale, dim=-1)  # (heads, T)
        out.append((weights[:, None, :] @ values).reshape(heads * d))
    return torch.stack(out)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (N, H) / sqrt(mean(x^2) + eps) * weight, one op."""
    return _RMS_NORM(x, weight, eps)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x += delta in place (the residual stream), then rms_norm(x), in one op."""
    return _ADD_RMS_NORM_(x, delta, weight, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up (N, 2 I) = [gate | up] -> (N, I)."""
    return _SILU_MUL(gate_up)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm formula."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
