"""`QuantizedLinear`, the native backend's replacement for nn.Linear, and the model pass.

Two kinds:
- "woq": int8 or int4 weights, float32 activations (weight-only quantization);
- "w8a8": int8 weights per output channel and int8 activations per row (SmoothQuant).
Both run on cpu_llm_kernels (AVX2, built at install) when present. Without it a plain
PyTorch path computes the same result, much more slowly; `kernel_status()` says which one a
server runs, and the quantization report carries it.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.nn.functional as F

from .quantlib import QuantizedTensor, QuantSpec, kernel_weights, quantize, unpack_int4

logger = logging.getLogger(__name__)

try:
    import cpu_llm_kernels as _kernels
except ImportError:  # not built (no compiler at install time, or another torch)
    _kernels = None

# Above this many rows (prefill), WoQ layers dequantize into a float GEMM. Measured on whole
# SmolLM2 prefills: the kernel wins up to 32 rows, dequantize + GEMM from 64 rows on
# (per layer shape: scripts/bench_kernels.py).
KERNEL_MAX_ROWS = 32
_scratch = torch.empty(0)  # reused dequantization buffer, grown to the largest layer


def _scratch_buffer(numel: int) -> torch.Tensor:
    """Storage for one dequantized weight. The serving worker runs one forward at a time, and
    each layer consumes its dequantized weight before the next layer asks for the buffer."""
    global _scratch
    if _scratch.numel() < numel:
        _scratch = torch.empty(numel)
    return _scratch[:numel]


def kernel_status() -> str:
    """Which implementation the quantized layers run on this host."""
    if _kernels is None:
        return "reference (cpu_llm_kernels not importable: slow; run make install)"
    if not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")):
        return "reference (the CPU lacks AVX2)"
    return "cpu_llm_kernels (AVX2)"


def _kernels_usable() -> bool:
    return kernel_status().startswith("cpu_llm_kernels")


def _reference_dequantize(qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor,
                          bits: int) -> torch.Tensor:
    stored = (unpack_int4(qweight) if bits == 4 else qweight).float()
    n, k = stored.shape
    grouped = stored.reshape(n, scales.shape[1], -1)
    return (grouped * scales[..., None] + offsets[..., None]).reshape(n, k)


def _reference_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(-1) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x / scale[:, None]).to(torch.int8), scale


class QuantizedLinear(torch.nn.Module):
    """y = x W^T + b with W stored as integers (see quantlib.kernel_weights for the layout)."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None, kind: str) -> None:
        super().__init__()
        if kind == "w8a8" and (qt.spec.bits, qt.spec.scheme, qt.spec.granularity) != (8, "symmetric", "channel"):
            raise ValueError("w8a8 needs symmetric per-channel 8-bit weights")
        self.out_features, self.in_features = qt.q.shape
        self.bits, self.kind, self.spec = qt.spec.bits, kind, qt.spec
        qweight, scales, offsets = kernel_weights(qt)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        group = self.in_features // scales.shape[1]
        self.use_kernel = _kernels_usable() and self.in_features % 32 == 0 and group % 32 == 0

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, spec: QuantSpec, kind: str = "woq") -> "QuantizedLinear":
        return cls(quantize(linear.weight, spec), linear.bias, kind)

    def dequantized_weight(self, reuse_buffer: bool = False) -> torch.Tensor:
        """The float32 weight; with `reuse_buffer` it lives in the shared scratch buffer and is
        only valid until the next layer's call."""
        if self.use_kernel:
            out = _scratch_buffer(self.out_features * self.in_features) if reuse_buffer else None
            return _kernels.dequantize_weight(self.qweight, self.scales, self.offsets, self.bits, out)
        return _reference_dequantize(self.qweight, self.scales, self.offsets, self.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        if self.kind == "w8a8":
            y = self._w8a8(x2)
        elif self.use_kernel and x2.shape[0] <= KERNEL_MAX_ROWS:
            y = _kernels.woq_linear(x2, self.qweight, self.scales, self.offsets, self.bits, self.bias)
        else:
            y = F.linear(x2, self.dequantized_weight(reuse_buffer=True), self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        wscale = self.scales[:, 0]
        if self.use_kernel:
            return _kernels.w8a8_linear(x, self.qweight, wscale, self.bias)
        xq, xscale = _reference_quantize_rows(x)
        y = (xq.float() @ self.qweight.float().T) * xscale[:, None] * wscale[None, :]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bits={self.bits}, {self.spec.scheme} per {self.spec.granularity}"
                + (f" of {self.spec.group_size}" if self.spec.group_size else "")
                + f", kernel={'avx2' if self.use_kernel else 'reference'}")


def as_linear(module: torch.nn.Module) -> torch.nn.Linear | None:
    """`module` as an nn.Linear if it is one in all but name: GPT-2's Conv1D is a linear layer
    with its weight stored transposed."""
    if type(module) is torch.nn.Linear:
        return module
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "nx"):
        linear = torch.nn.Linear(module.nx, module.nf, bias=module.bias is not None, device="meta")
        linear.weight = torch.nn.Parameter(module.weight.detach().T, requires_grad=False)
        linear.bias = module.bias
        return linear
    return None


def replace_linears(model: torch.nn.Module, convert: Callable[[str, torch.nn.Linear], torch.nn.Module]) -> list[str]:
    """Replace every linear layer of `model` by `convert(name, linear)`; returns the names replaced.

    Layers to keep in full precision are wrapped beforehand (quantize.keep_full_precision)
    so they are no longer nn.Linear; embeddings are nn.Embedding and are never touched.
    """
    targets = [(name, linear) for name, module in model.named_modules()
               if (linear := as_linear(module)) is not None]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, convert(name, linear))
    return [name for name, _ in targets]
