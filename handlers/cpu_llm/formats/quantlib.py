"""Integer quantization of tensors: quantize, dequantize, measure the error, pack for kernels.

Pure functions on tensors, no model knowledge. A weight [N, K] (N output channels) gets one
scale per tensor, per output channel or per group of `group_size` input columns, either
symmetric (zero point 0, values in [-qmax, qmax]) or affine (unsigned values with a zero
point, for weights not centred on zero). Dequantized weight = (q - zero) * scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GRANULARITIES = ("tensor", "channel", "group")
SCHEMES = ("symmetric", "affine")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
FP16_TINY = 2.0**-24  # smallest float16 (subnormal): a float16 scale is never rounded to zero


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 8  # 8 or 4
    scheme: str = "symmetric"
    granularity: str = "channel"
    group_size: int = 0  # columns per scale when granularity == "group"
    # float16 halves the scales' memory traffic, which matters for int4 in groups of 32 (2 bytes
    # of scale per 16 bytes of weights); values are quantized against the rounded scale.
    scale_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8 (got {self.bits})")
        if self.scheme not in SCHEMES or self.granularity not in GRANULARITIES:
            raise ValueError(f"scheme must be one of {SCHEMES}, granularity one of {GRANULARITIES}")
        if (self.granularity == "group") != (self.group_size > 0):
            raise ValueError("group_size is required with (and only with) granularity 'group'")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)} (got {self.scale_dtype})")

    @property
    def qrange(self) -> tuple[int, int]:
        """Integer range. Symmetric 8-bit stays within +-127 so that -q never overflows (the
        int8 kernels negate weights). Symmetric 4-bit uses all 16 levels, [-8, 7], as llama.cpp's
        Q4_0: the group's extreme value maps to -8 exactly, through a negative scale if it is
        positive (measured on SmolLM2: +19 % perplexity instead of +29 % with [-7, 7])."""
        if self.scheme == "symmetric":
            qmax = 2 ** (self.bits - 1) - 1
            return (-qmax - 1, qmax) if self.bits == 4 else (-qmax, qmax)
        return 0, 2**self.bits - 1


@dataclass
class QuantizedTensor:
    q: torch.Tensor  # integer values (int16 holds both 8-bit ranges), shape [N, K]
    scale: torch.Tensor  # float32 [N or 1, groups]
    zero: torch.Tensor  # float32, same shape as scale (all 0 when symmetric)
    spec: QuantSpec

    @property
    def group_size(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def nbytes(self) -> int:
        """Storage of the packed weight plus its scales and zero points."""
        params = self.scale.numel() * (2 if self.spec.scheme == "affine" else 1)
        return math.ceil(self.q.numel() * self.spec.bits / 8) + 4 * params


def _grouped(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """View w as [rows, groups, columns per group] for the spec's granularity."""
    n, k = w.shape
    if spec.granularity == "tensor":
        return w.reshape(1, 1, n * k)
    if spec.granularity == "channel":
        return w.reshape(n, 1, k)
    if k % spec.group_size:
        raise ValueError(f"{k} input columns are not a multiple of group_size {spec.group_size}")
    return w.reshape(n, k // spec.group_size, spec.group_size)


def quantize(w: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Round a 2-D float tensor to `spec.bits`-bit integers with the spec's scales."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    g = _grouped(w.detach().float(), spec)
    low, high = spec.qrange
    if spec.scheme == "symmetric" and spec.bits == 4:
        extreme = g.gather(-1, g.abs().argmax(-1, keepdim=True))[..., 0]  # signed value of largest |w|
        scale = extreme / low  # may be negative: the extreme lands on -8 either way
        zero = torch.zeros_like(scale)
    elif spec.scheme == "symmetric":
        scale = g.abs().amax(-1) / high
        zero = torch.zeros_like(scale)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # keep 0.0 exactly representable
        scale = (hi - lo) / (high - low)
        zero = torch.round(-lo / scale.clamp(min=1e-12)).clamp(low, high)
    sign = torch.where(scale < 0, -1.0, 1.0)
    scale = scale.abs().clamp(min=1e-12)  # an all-zero group quantizes to zeros, not NaN
    if spec.scale_dtype == "float16":  # magnitude rounded up, so the range still covers every value
        half = scale.clamp(FP16_TINY, 65504.0).half()
        up = torch.nextafter(half, torch.tensor(torch.inf, dtype=half.dtype))
        half = torch.where(half.float() < scale, up, half)
        scale = half.float()
    scale = scale * sign
    if spec.scheme == "affine" and spec.scale_dtype == "float16":
        zero = torch.round(-lo / scale).clamp(low, high)
    q = torch.round(g / scale[..., None] + zero[..., None]).clamp(low, high)
    return QuantizedTensor(q.reshape(w.shape).to(torch.int16), scale.contiguous(), zero.contiguous(), spec)


def dequantize(t: QuantizedTensor) -> torch.Tensor:
    """The float32 tensor a QuantizedTensor stands for."""
    n, k = t.q.shape
    g = _grouped(t.q.float(), t.spec)
    return ((g - t.zero[..., None]) * t.scale[..., None]).reshape(n, k)


def error_metrics(w: torch.Tensor, w_hat: torch.Tensor) -> dict[str, float]:
    """How far a dequantized tensor is from the original."""
    w, err = w.detach().float(), (w_hat.detach().float() - w.detach().float())
    signal, noise = float(w.pow(2).sum()), float(err.pow(2).sum())
    return {
        "max_abs_error": float(err.abs().max()),
        "mean_abs_error": float(err.abs().mean()),
        "relative_error": math.sqrt(noise / signal) if signal else 0.0,  # ||err|| / ||w||
        "snr_db": 10 * math.log10(signal / noise) if noise else math.inf,
    }


# --- layouts of cpu_llm_kernels (kernels/csrc/isa.h) ---------------------------------------

@dataclass(frozen=True)
class PackedWeight:
    """A quantized weight as the kernels read it: weight = stored * scale + offset, where the
    offset is `offsets` when given, else -zero * scale (symmetric formats need no stored offset)."""
    qweight: torch.Tensor  # int8 [N, K], or uint8 [N, K/2] for 4 bits (pack_int4)
    scales: torch.Tensor  # float32 or float16 [N, groups]
    offsets: torch.Tensor | None  # float32 [N, groups]
    bits: int
    zero: float

    @property
    def shape(self) -> tuple[int, int]:
        n, stored = self.qweight.shape
        return n, stored * (2 if self.bits == 4 else 1)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, in plain PyTorch (the reference the kernels are tested against)."""
        stored = (unpack_int4(self.qweight) if self.bits == 4 else self.qweight).float()
        n, k = stored.shape
        scales = self.scales.float()
        offsets = self.offsets if self.offsets is not None else -self.zero * scales
        grouped = stored.reshape(n, scales.shape[1], -1)
        return (grouped * scales[..., None] + offsets[..., None]).reshape(n, k)


def kernel_weights(t: QuantizedTensor) -> PackedWeight:
    """`t` in the kernels' layout. 8 bits are stored as int8 (affine values shifted by -128, with
    offsets), 4 bits as unsigned nibbles packed two per byte (symmetric values shifted by +8,
    which the kernels take back as zero = 8)."""
    n, k = t.q.shape
    bits, symmetric = t.spec.bits, t.spec.scheme == "symmetric"
    shift = {(8, True): 0, (8, False): 128, (4, True): -8, (4, False): 0}[(bits, symmetric)]
    stored = t.q - shift
    scale = t.scale.expand(n, -1)
    offsets = None if symmetric else ((shift - t.zero) * t.scale).expand(n, -1).contiguous()
    scales = scale.to(SCALE_DTYPES[t.spec.scale_dtype]).contiguous()
    qweight = stored.to(torch.int8).contiguous() if bits == 8 else pack_int4(stored.to(torch.uint8))
    return PackedWeight(qweight, scales, offsets, bits, float(-shift) if symmetric else 0.0)


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[N, K] values in 0..15 -> [N, K/2] bytes: in each block of 32 values, byte j holds
    value j (low nibble) and value j + 16 (high nibble), so a block unpacks with two ANDs."""
    n, k = values.shape
    if k % 32:
        raise ValueError(f"int4 packing needs a multiple of 32 columns (got {k})")
    blocks = values.to(torch.uint8).reshape(n, k // 32, 32)
    return (blocks[..., :16] | (blocks[..., 16:] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of pack_int4."""
    n, half = packed.shape
    blocks = packed.reshape(n, half // 16, 16)
    return torch.cat([blocks & 0x0F, blocks >> 4], dim=-1).reshape(n, half * 2)
