"""Fusing linear layers that read the same input (q/k/v, gate/up) into one, so a decode step
reads that input's weights in one pass and pays one op's overhead instead of three.

Every weight format we serve is quantized per output row (or per group along a row), so the
fused layer's weight is the row-wise concatenation of the parts' stored weights: quantizing the
concatenation would give the same integers and scales. Parts of different kinds (one kept in
fp32 by `keep_full_precision`, say) are not merged: `Concat` runs them side by side.

Full-precision weights are not copied either: transformers memory-maps fp32 checkpoints, so a
concatenated copy would be resident beside the mapped pages it was read from (measured on a 1B
model: serving RSS 7.0 GB instead of 4.5). On our fp32 kernel they are still computed in one call
(`FullPrecisionGroup`, over the weights where they lie); on the BLAS, side by side.
"""

from __future__ import annotations

import torch

from .. import kernels
from ..formats import tiling
from ..formats.quantlib import PackedWeight
from .quantized_linear import FP32_KERNEL_MAX_ROWS, FullPrecisionLinear, QuantizedLinear, stack_linear_f32


class Concat(torch.nn.Module):
    """cat([part(x) for part in parts], -1): the fallback for parts that cannot share a weight."""

    def __init__(self, parts: list[torch.nn.Module]) -> None:
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)

    def stack_linear(self) -> kernels.StackLinear | None:
        """Plain fp32 nn.Linear parts, all with a bias or none: one BLAS product each, as forward()
        computes them, for the decoder stack (None for other parts)."""
        parts = list(self.parts)
        if not all(type(p) is torch.nn.Linear for p in parts) or len({p.bias is None for p in parts}) != 1:
            return None
        return stack_linear_f32([p.weight for p in parts], _cat_bias(parts, [p.weight.shape[0] for p in parts]),
                                use_kernel=False)


class FullPrecisionGroup(Concat):
    """fp32 parts on our matrix-vector kernel, left where they are (memory-mapped): decode rows
    take one `linear_f32_cat` call writing every part's columns, longer inputs one product each."""

    def __init__(self, parts: list[FullPrecisionLinear]) -> None:
        super().__init__(parts)
        self.weights = [part.weight for part in parts]
        self.register_buffer("bias", _cat_bias(parts, [part.weight.shape[0] for part in parts]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= FP32_KERNEL_MAX_ROWS and x.dtype == torch.float32 and x.is_contiguous():
            return kernels.linear_f32_cat(x, self.weights, self.bias)
        return super().forward(x)

    def stack_linear(self) -> kernels.StackLinear | None:
        """The op forward() calls for 2-D float32 decode rows, for the decoder stack."""
        return stack_linear_f32(self.weights, self.bias, use_kernel=True)


def _cat_bias(parts: list[torch.nn.Module], rows: list[int]) -> torch.Tensor | None:
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias.detach().float() if p.bias is not None else torch.zeros(n)
                      for p, n in zip(parts, rows)])


def _quantized_key(m: QuantizedLinear) -> tuple:
    return (m.kind, m.compute, m.bits, m.zero, m.spec, m.scales.dtype, m.offsets is None, m.in_features, m.tiled)


def fuse_linears(parts: list[torch.nn.Module]) -> torch.nn.Module:
    """One layer computing cat([part(x) for part in parts], -1)."""
    kinds = {type(p) for p in parts}
    if kinds == {FullPrecisionLinear} and all(p.use_kernel for p in parts) \
            and len({(p.weight.shape[1], p.weight.dtype) for p in parts}) == 1 and parts[0].weight.dtype == torch.float32:
        return FullPrecisionGroup(parts)
    if kinds == {QuantizedLinear} and len({_quantized_key(p) for p in parts}) == 1:
        first = parts[0]
        bias = _cat_bias(parts, [p.out_features for p in parts])
        if first.tiled:  # tile_model ran at load
            return QuantizedLinear(tiling.concat([p.tiled_weight for p in parts]), bias, first.spec, first.kind,
                                   first.compute)
        packed = PackedWeight(
            torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
            None if first.offsets is None else torch.cat([p.offsets for p in parts]), first.bits, first.zero)
        return QuantizedLinear(packed, bias, first.spec, first.kind, first.compute)
    return Concat(parts)
