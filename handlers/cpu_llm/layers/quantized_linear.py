"""The native backend's layers: quantized linear layers and embedding, the fp32 linear layer, and
the pass that swaps them into a model.

- `QuantizedLinear`, kind "woq": int8 or int4 weights; compute "int8" quantizes the activations
  per block of 32 and uses integer dot products (IPEX's lowp_mode INT8), compute "fp32"
  dequantizes the weights in registers and keeps fp32 activations (lowp_mode NONE).
- `QuantizedLinear`, kind "w8a8": SmoothQuant, int8 weights per output channel and int8
  activations per row.
- `QuantizedEmbedding`: int8 rows with one scale each, gathered; a tied LM head shares them.
- `FullPrecisionLinear`: an fp32 layer quantization passes leave alone, on our matrix-vector
  kernel when the host's BLAS is slower at decode shapes.
All run on the compiled kernels (kernels.py) when present; `use_kernel` says so per layer.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import kernels
from ..formats import tiling
from ..formats.quantlib import PackedWeight, QuantSpec, kernel_weights, quantize

KINDS = ("woq", "w8a8")
COMPUTES = ("int8", "fp32")
# fp32 compute: above this many rows (prefill), dequantize into a float GEMM. Measured on whole
# SmolLM2 prefills: the kernel wins up to 32 rows (per layer shape: scripts/bench_kernels.py).
KERNEL_MAX_ROWS = 32
# Our fp32 matrix-vector kernel serves up to this many rows; the BLAS GEMM is better above.
FP32_KERNEL_MAX_ROWS = 8


class QuantizedLinear(torch.nn.Module):
    """y = x W^T + b with W stored as integers (quantlib.kernel_weights gives the layout)."""

    def __init__(self, packed: PackedWeight | tiling.TiledWeight, bias: torch.Tensor | None, spec: QuantSpec,
                 kind: str = "woq", compute: str = "fp32") -> None:
        super().__init__()
        if kind not in KINDS or compute not in COMPUTES:
            raise ValueError(f"kind must be one of {KINDS}, compute one of {COMPUTES}")
        if kind == "w8a8" and (spec.bits, spec.scheme, spec.granularity) != (8, "symmetric", "channel"):
            raise ValueError("w8a8 needs symmetric per-channel 8-bit weights")
        self.out_features, self.in_features = packed.shape
        self.tiled = isinstance(packed, tiling.TiledWeight)  # qweight/scales in the tiled layout (tile())
        self.bits, self.kind, self.spec = packed.bits, kind, spec
        self.zero = tiling.ZERO[packed.bits] if self.tiled else packed.zero
        self.register_buffer("qweight", packed.tiles if self.tiled else packed.qweight)
        self.register_buffer("scales", packed.scales)  # [N, groups], or [tiles, groups, 16]
        self.register_buffer("offsets", None if self.tiled else packed.offsets)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        group = self.in_features // packed.scales.shape[1]
        self.use_kernel = kernels.kernels_available() and self.in_features % kernels.BLOCK == 0 and group % kernels.BLOCK == 0
        # Activations are quantized per block of 32: a width that is not a multiple of 32 keeps fp32 compute.
        self.compute = compute if self.in_features % kernels.BLOCK == 0 else "fp32"
        self.integer_kernel = self.use_kernel and (kind == "w8a8" or self.compute == "int8")

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, spec: QuantSpec, kind: str = "woq",
                    compute: str = "fp32") -> "QuantizedLinear":
        return cls(kernel_weights(quantize(weight, spec)), bias, spec, kind, compute)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, spec: QuantSpec, kind: str = "woq",
                    compute: str = "fp32") -> "QuantizedLinear":
        return cls.from_weight(linear.weight, linear.bias, spec, kind, compute)

    @property
    def packed(self) -> PackedWeight:
        """The weight in the row layout (a copy when tiled)."""
        if self.tiled:
            return self.tiled_weight.untile()
        return PackedWeight(self.qweight, self.scales, self.offsets, self.bits, self.zero)

    @property
    def tiled_weight(self) -> tiling.TiledWeight:
        return tiling.TiledWeight(self.qweight, self.scales, self.bits, self.out_features)

    def can_tile(self) -> bool:
        """Whether the kernels serve the weight tiled (integer compute, symmetric weights)."""
        return not self.tiled and self.integer_kernel and tiling.can_tile(self.packed)

    def tile(self, scratch: torch.Tensor | None = None) -> bool:
        """Move the weight into the tiled layout, in place, where can_tile(); True if it did."""
        if not self.can_tile():
            return False
        self.qweight, self.scales = tiling.tile(self.packed, in_place=True, scratch=scratch)
        self.tiled = True
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tiled:
            shape = x.shape
            x2 = x if x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous() \
                else x.reshape(-1, self.in_features).float().contiguous()  # (rows, K)
            y = kernels.qlinear_tiled(x2, self.qweight, self.scales, self.bits, self.out_features, self.kind == "w8a8",
                                  self.bias)
            return y if x2 is x else y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        if self.integer_kernel and x.dim() == 2 and x.dtype == torch.float32 and x.is_contiguous():
            # The model runner's rows: straight to the kernel (each step below costs ~1 us, x 200 calls).
            return kernels.qlinear_2d(x, self.qweight, self.scales, self.offsets, self.bits, self.zero,
                                  self.kind == "w8a8", self.bias)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (rows, K)
        if self.kind == "w8a8" or self.compute == "int8":
            # Every row count takes the same integer path, so a row's result never depends on
            # how many rows (prompt tokens, batch companions) share the call.
            y = kernels.qlinear(x2, self.packed, self.kind == "w8a8", self.bias, self.use_kernel)
        elif self.use_kernel and x2.shape[0] <= KERNEL_MAX_ROWS:
            y = kernels.woq_linear_f32(x2, self.packed, self.bias, self.use_kernel)
        else:
            y = F.linear(x2, kernels.dequantize_shared(self.packed, self.use_kernel), self.bias)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def stack_linear(self) -> kernels.StackLinear | None:
        """The op forward() calls for 2-D float32 rows, for the decoder stack (None: no kernel)."""
        weights = (self.qweight, self.scales) + (() if self.offsets is None else (self.offsets,))
        if self.tiled:
            return kernels.StackLinear(kernels.STACK_TILED, weights, self.bias, self.bits, self.out_features,
                                   act_per_row=self.kind == "w8a8")
        if self.integer_kernel:
            return kernels.StackLinear(kernels.STACK_ROWS, weights, self.bias, self.bits, zero=self.zero,
                                   act_per_row=self.kind == "w8a8")
        if self.use_kernel:
            return kernels.StackLinear(kernels.STACK_WOQ_F32, weights, self.bias, self.bits, zero=self.zero,
                                   max_rows=KERNEL_MAX_ROWS)
        return None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bits={self.bits}, {self.spec.scheme} per {self.spec.granularity}"
                + (f" of {self.spec.group_size}" if self.spec.group_size else "")
                + f", compute={self.compute}, kernel={kernels.current_isa() if self.use_kernel else 'reference'}"
                + (", tiled" if self.tiled else ""))


class QuantizedEmbedding(torch.nn.Module):
    """An embedding table stored as int8 rows with one scale each (symmetric): a lookup gathers
    the rows it needs and scales them. A tied LM head reads the same int8 table."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)  # int8 [vocab, hidden]
        self.register_buffer("scales", scales)  # float32 [vocab, 1]
        self.tiled = False

    def read_tiles_of(self, head: "QuantizedLinear") -> None:
        """Gather from the tied LM head's table, now tiled (in place, or a new tensor whose row
        copy is then released)."""
        self.qweight, self.tiled = head.qweight, True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = tiling.int8_rows(self.qweight, ids) if self.tiled else self.qweight[ids]
        return rows.float() * self.scales[ids]  # (..., hidden)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per row"


class FullPrecisionLinear(torch.nn.Module):
    """An fp32 linear layer that quantization passes do not recognise (it is not an nn.Linear).
    With `use_kernel`, decode-sized inputs take our matrix-vector kernel (see fp32_matvec)."""

    def __init__(self, linear: torch.nn.Linear, use_kernel: bool = False) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.use_kernel = use_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and x.dim() == 2 and x.shape[0] <= FP32_KERNEL_MAX_ROWS and x.dtype == torch.float32 \
                and x.is_contiguous():  # the model runner's decode rows, straight to the kernel
            return kernels.linear_f32(x, self.weight, self.bias)
        rows = x.numel() // x.shape[-1]
        if self.use_kernel and rows <= FP32_KERNEL_MAX_ROWS and x.dtype == torch.float32:
            y = kernels.linear_f32(x.reshape(rows, -1).contiguous(), self.weight, self.bias)
            return y.reshape(*x.shape[:-1], self.weight.shape[0])
        return F.linear(x, self.weight, self.bias)

    def stack_linear(self) -> kernels.StackLinear | None:
        """The op forward() calls for 2-D float32 rows, for the decoder stack."""
        return stack_linear_f32([self.weight], self.bias, self.use_kernel)


def stack_linear_f32(weights: list[torch.Tensor], bias: torch.Tensor | None, use_kernel: bool) -> kernels.StackLinear | None:
    """fp32 weights (side by side) as the decoder stack calls them: our matrix-vector kernel for
    decode rows where `use_kernel`, else the BLAS, one product per weight; None for other dtypes."""
    if any(w.dtype != torch.float32 for w in weights):
        return None
    if use_kernel:
        return kernels.StackLinear(kernels.STACK_F32, tuple(weights), bias, max_rows=FP32_KERNEL_MAX_ROWS)
    return kernels.StackLinear(kernels.STACK_BLAS, tuple(weights), bias)


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of the model as the checkpoint had them, quantized ones included (a tied table
    counted once)."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = [(t, t.numel()) for t in module.parameters(recurse=False)]
        if isinstance(module, QuantizedLinear):
            tensors.append((module.qweight, module.out_features * module.in_features))
        elif isinstance(module, QuantizedEmbedding):
            tensors.append((module.qweight, module.num_embeddings * module.embedding_dim))
        for tensor, count in tensors:
            if tensor.data_ptr() not in seen:
                seen.add(tensor.data_ptr())
                total += count
    return total


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


def set_module(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    """Put `module` at dotted path `name` of `model` (replacing what was there)."""
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def replace_linears(model: torch.nn.Module, convert: Callable[[str, torch.nn.Linear], torch.nn.Module]) -> list[str]:
    """Replace every linear layer of `model` by `convert(name, linear)`; returns the names replaced.

    Layers to keep in full precision are wrapped beforehand (quantize.keep_full_precision)
    so they are no longer nn.Linear; embeddings are nn.Embedding and are never touched.
    """
    targets = [(name, linear) for name, module in model.named_modules()
               if (linear := as_linear(module)) is not None]
    for name, linear in targets:
        set_module(model, name, convert(name, linear))
    return [name for name, _ in targets]


def tile_model(model: torch.nn.Module) -> int:
    """Tile every quantized linear layer the kernels serve tiled (QuantizedLinear.tile, in place);
    a tied embedding shares the LM head's table and reads it tiled from then on. Returns the
    number of layers tiled."""
    shared = {m.qweight.data_ptr(): m for m in model.modules() if isinstance(m, QuantizedEmbedding)}
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and m.can_tile()]
    scratch = torch.empty(max((tiling.scratch_bytes(m.packed) for m in layers), default=0), dtype=torch.uint8)
    for module in layers:
        table = module.qweight.data_ptr()
        module.tile(scratch)
        if table in shared:
            shared[table].read_tiles_of(module)
    return len(layers)
