"""The tiled weight layout of the integer kernels (kernels/csrc/isa.h, TiledWeights), the
conversions to and from it (quantized_linear.tile_model applies it to a model once, at load).

Why a second layout: in the row layout each output row pays its own scale work per block of 32
columns and a horizontal sum at the end; interleaving 16 rows 4 bytes at a time lets one
512-bit dot product (AVX-512 VNNI) serve 16 rows with one activation broadcast, or one 256-bit
one (AVX2) 8 rows, and the scale work and int4 unpacking be shared by those rows (see
kernels/csrc/x86/avx512/tiled.cpp and x86/avx2/tiled.cpp). Every ISA with integer kernels reads
the same tiles, so symmetric integer layers are tiled on every host.

Per tile of 16 rows and block of 32 columns: int8 [8 groups of 4 columns][16 rows][4 bytes],
stored unsigned (w + 128); int4 [4 groups][16 rows][4 bytes], where the row layout's bytes
(pack_int4: low nibble column j, high nibble j + 16) keep their order. Scales [tiles, groups, 16].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .quantlib import PackedWeight

TILE = 16  # output rows per tile: the float32 lanes of a 512-bit register
SLICE_TILES = 64  # tiles converted at a time (1,024 rows)
ZERO = {8: 0.0, 4: 8.0}  # the symmetric formats' zero points in the row layout (quantlib.kernel_weights)


@dataclass(frozen=True)
class TiledWeight:
    """A symmetric weight in the tiled layout: what QuantizedLinear holds once tiled."""
    tiles: torch.Tensor  # uint8 [T, K x 16] (8 bits) or [T, K x 8] (4 bits)
    scales: torch.Tensor  # float32 or float16 [T, groups, 16]
    bits: int
    n: int  # output rows (the last tile may be partial)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.tiles.shape[1] // (TILE if self.bits == 8 else TILE // 2)

    def untile(self) -> PackedWeight:
        return untile(self.tiles, self.scales, self.bits, self.n)


def concat(parts: list[TiledWeight]) -> TiledWeight:
    """The weight of cat([x @ part.T for part in parts], -1): whole tiles stacked when every
    part but the last fills its tiles (no untiling), else through the row layout."""
    first = parts[0]
    if all(p.n % TILE == 0 for p in parts[:-1]):
        return TiledWeight(torch.cat([p.tiles for p in parts]), torch.cat([p.scales for p in parts]), first.bits,
                           sum(p.n for p in parts))
    rows = [p.untile() for p in parts]
    fused = PackedWeight(torch.cat([w.qweight for w in rows]), torch.cat([w.scales for w in rows]), None, first.bits,
                         rows[0].zero)
    return TiledWeight(*tile(fused, in_place=True), first.bits, fused.shape[0])


def can_tile(w: PackedWeight) -> bool:
    """Symmetric formats only: the tiled kernel takes the zero point out in integers."""
    return w.offsets is None and ZERO.get(w.bits) == w.zero


def _groups_of_4(bits: int) -> int:
    return 8 if bits == 8 else 4  # 4-byte column groups per block of 32 columns


def scratch_bytes(w: PackedWeight) -> int:
    """The scratch tile() needs for `w` (one slice of rows)."""
    return min(-(-w.shape[0] // TILE), SLICE_TILES) * TILE * w.qweight.shape[1]


def tile(w: PackedWeight, in_place: bool = False, scratch: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles uint8 [T, K x 16 or K x 8], scales [T, groups, 16]) of `w`, T = ceil(N / 16).

    A tile holds the same bytes as its 16 rows in the row layout, only reordered, so with
    `in_place` (and N a multiple of 16) the tiles are written over w.qweight's own memory: a
    model is tiled at load without a second copy of any layer (w.qweight is spent then).
    `scratch` (uint8, at least scratch_bytes(w)) lets a whole model share one slice buffer."""
    if not can_tile(w):
        raise ValueError(f"only symmetric int8/int4 weights can be tiled (bits {w.bits}, zero {w.zero}, "
                         f"offsets {'given' if w.offsets is not None else 'none'})")
    n, k = w.shape
    tiles, g4 = -(-n // TILE), _groups_of_4(w.bits)
    stored = w.qweight.view(torch.uint8)  # (N, row bytes)
    row_bytes = stored.shape[1]
    if in_place and n % TILE == 0 and stored.is_contiguous():
        out = stored.view(tiles, row_bytes * TILE)
    else:
        out = torch.empty(tiles, row_bytes * TILE, dtype=torch.uint8)
    # One scratch slice, reused: tiling adds a slice to memory, never a copy of the layer, and
    # short-lived allocations per slice or per layer would fragment the heap (they raised the
    # peak RSS of loading SmolLM2 by up to 50 MB).
    need = scratch_bytes(w)
    if scratch is None or scratch.numel() < need:
        scratch = torch.empty(need, dtype=torch.uint8)
    scratch = scratch[:need].view(-1, row_bytes)
    for start in range(0, tiles, SLICE_TILES):
        stop = min(tiles, start + SLICE_TILES)
        rows = stored[start * TILE:min(n, stop * TILE)]
        part = scratch[:(stop - start) * TILE]  # (tiles x 16, row bytes)
        part[:rows.shape[0]].copy_(rows)
        part[rows.shape[0]:] = 0  # the padding rows of a partial last tile
        if w.bits == 8:
            part.bitwise_xor_(0x80)  # the kernel reads int8 as unsigned bytes
        out[start:stop].view(stop - start, k // 32, g4, TILE, 4).copy_(
            part.view(stop - start, TILE, k // 32, g4, 4).permute(0, 2, 3, 1, 4))
    scales = F.pad(w.scales, (0, 0, 0, tiles * TILE - n)).view(tiles, TILE, -1).transpose(1, 2)  # (T, groups, 16)
    return out, scales.contiguous()


def untile(tiles: torch.Tensor, scales: torch.Tensor, bits: int, n: int) -> PackedWeight:
    """The row layout again (reports, fusing layers whose widths are not multiples of 16)."""
    t = tiles.shape[0]
    k = tiles.shape[1] // (TILE if bits == 8 else TILE // 2)
    g4 = _groups_of_4(bits)
    rows = tiles.view(t, k // 32, g4, TILE, 4).permute(0, 3, 1, 2, 4).reshape(t * TILE, -1)[:n]
    qweight = (rows ^ 0x80).view(torch.int8) if bits == 8 else rows
    return PackedWeight(qweight.contiguous(), scales.transpose(1, 2).reshape(t * TILE, -1)[:n].contiguous(), None,
                        bits, ZERO[bits])


def int8_rows(tiles: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of a tiled int8 weight as int8 (..., K): a tied embedding's lookup."""
    t = tiles.shape[0]
    k = tiles.shape[1] // TILE
    blocks = tiles.view(t, k // 32, 8, TILE, 4)
    rows = blocks[ids // TILE, :, :, ids % TILE]  # (*ids.shape, blocks, 8, 4)
    return (rows ^ 0x80).view(torch.int8).reshape(*ids.shape, k)

