"""The only importer of the compiled kernels (kernels/csrc): torch ops, their reference twins,
and which of the two this host runs.

The kernels are registered as torch ops (`torch.ops.cpu_llm.*`) with fake implementations, so
they can sit inside compiled graphs. Each has a plain PyTorch twin computing the same formula;
it is what the kernels are tested against, and what serves only when a config opts into it
(`quantization.allow_reference_kernels`): it is 10-20x slower than fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .quantlib import PackedWeight

try:
    import cpu_llm_kernels as _kernels
except ImportError:  # not built (no compiler at install time, or built for another torch)
    _kernels = None

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
    return f"cpu_llm_kernels ({_kernels.isa()})"


def supported_isas() -> list[str]:
    """Instruction sets the kernels can run here, best first (tests run each)."""
    return list(_kernels.supported_isas()) if _kernels is not None else []


def set_isa(name: str) -> None:
    """Run the kernels on `name` (one of supported_isas()); tests use it to cover every path."""
    _kernels.set_isa(name)


def current_isa() -> str:
    return _kernels.isa() if _kernels is not None else "none"


if _kernels is not None:
    @torch.library.register_fake("cpu_llm::qlinear")
    def _(x, qweight, scales, offsets, bits, zero, act_per_row, bias):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("cpu_llm::woq_linear_f32")
    def _(x, qweight, scales, offsets, bits, zero, bias):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @torch.library.register_fake("cpu_llm::linear_f32")
    def _(x, weight, bias):
        return x.new_empty(x.shape[0], weight.shape[0])


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
        return torch.ops.cpu_llm.qlinear(x, w.qweight, w.scales, w.offsets, w.bits, w.zero, act_per_row, bias)
    return _add_bias(quantize_activations(x, act_per_row) @ w.dequantize().T, bias)


def woq_linear_f32(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, use_kernel: bool) -> torch.Tensor:
    """x [M, K] float32 @ w.T with the weight dequantized in registers, fp32 throughout."""
    if use_kernel:
        return torch.ops.cpu_llm.woq_linear_f32(x, w.qweight, w.scales, w.offsets, w.bits, w.zero, bias)
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
    torch.ops.cpu_llm.dequantize_into(w.qweight, w.scales, w.offsets, w.bits, w.zero, out)
    return out.view(n, k)


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ weight.T in fp32 with our matrix-vector kernel (decode on hosts whose BLAS is slow)."""
    return torch.ops.cpu_llm.linear_f32(x, weight, bias)
