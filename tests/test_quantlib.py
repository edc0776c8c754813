"""Tensor quantization: ranges, granularities, round trips, error metrics, int4 packing."""

from __future__ import annotations

import math

import pytest
import torch

from cpu_llm.formats.quantlib import (QuantSpec, dequantize, error_metrics, kernel_weights, pack_int4, quantize, unpack_int4)

SPECS = [
    QuantSpec(8, "symmetric", "tensor"), QuantSpec(8, "symmetric", "channel"), QuantSpec(8, "affine", "channel"),
    QuantSpec(8, "symmetric", "group", 32), QuantSpec(4, "symmetric", "group", 32),
    QuantSpec(4, "affine", "group", 32), QuantSpec(4, "affine", "channel"),
    QuantSpec(4, "symmetric", "group", 32, "float16"), QuantSpec(8, "affine", "group", 32, "float16"),
]


def _weight(n: int = 48, k: int = 128) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.randn(n, k) * torch.linspace(0.1, 3.0, n)[:, None]  # channels of different ranges
    w[3] += 0.7  # a skewed channel, which affine handles better
    return w


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_values_stay_in_range_and_error_is_within_half_a_step(spec):
    w = _weight()
    t = quantize(w, spec)
    low, high = spec.qrange
    assert t.q.min() >= low and t.q.max() <= high
    expected_groups = {"tensor": (1, 1), "channel": (48, 1), "group": (48, 128 // 32)}[spec.granularity]
    assert tuple(t.scale.shape) == expected_groups
    step = t.scale.abs().expand(48, -1).repeat_interleave(t.group_size, dim=1)
    error = (dequantize(t) - w).abs()
    if (spec.bits, spec.scheme) == (4, "symmetric"):
        # [-8, 7] as Q4_0: the extreme is exact, values near minus the extreme clamp to 7 (up to a step off)
        assert (error <= step + 1e-6).all() and float((error > step / 2 + 1e-6).float().mean()) < 0.02
        extreme_error = error.reshape(48, -1, t.group_size).amin(-1)  # each group's extreme is (nearly) exact
        assert (extreme_error <= 0.01 * t.scale.abs().expand(48, -1) + 1e-6).all()
    else:
        assert (error <= step / 2 + 1e-6).all()


def test_finer_granularity_and_more_bits_mean_less_error():
    w = _weight()
    snr = {str(s): error_metrics(w, dequantize(quantize(w, s)))["snr_db"] for s in SPECS}
    assert snr[str(QuantSpec(8, "symmetric", "channel"))] > snr[str(QuantSpec(8, "symmetric", "tensor"))] + 3
    assert snr[str(QuantSpec(8, "symmetric", "group", 32))] > snr[str(QuantSpec(8, "symmetric", "channel"))]
    assert snr[str(QuantSpec(8, "symmetric", "channel"))] > snr[str(QuantSpec(4, "affine", "group", 32))] + 15
    assert snr[str(QuantSpec(4, "affine", "group", 32))] > snr[str(QuantSpec(4, "affine", "channel"))]


def test_symmetric_zero_is_exact_and_all_zero_groups_survive():
    w = torch.zeros(4, 64)
    w[0, :5] = torch.tensor([0.5, -1.0, 0.0, 0.25, 1.0])
    for spec in SPECS:
        back = dequantize(quantize(w, spec))
        assert torch.isfinite(back).all()
        assert (back[1:] == 0).all() and back[0, 2] == 0


def test_error_metrics_on_a_known_error():
    w = torch.tensor([[3.0, 4.0]])
    m = error_metrics(w, w + torch.tensor([[0.0, 0.5]]))
    assert m["max_abs_error"] == 0.5 and m["mean_abs_error"] == 0.25
    assert m["relative_error"] == pytest.approx(0.5 / 5)
    assert m["snr_db"] == pytest.approx(10 * math.log10(25 / 0.25))
    assert error_metrics(w, w)["snr_db"] == math.inf


def test_int4_packing_round_trips_and_follows_the_kernel_layout():
    values = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    packed = pack_int4(values)
    assert packed.shape == (3, 32) and torch.equal(unpack_int4(packed), values)
    assert packed[0, 0] == values[0, 0] | (values[0, 16] << 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_int4(torch.zeros(1, 48, dtype=torch.uint8))


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_kernel_layout_describes_the_same_weight(spec):
    w = _weight()
    t = quantize(w, spec)
    packed = kernel_weights(t)
    values = (unpack_int4(packed.qweight) if spec.bits == 4 else packed.qweight).float()
    assert packed.scales.dtype == (torch.float16 if spec.scale_dtype == "float16" else torch.float32)
    assert (packed.offsets is None) == (spec.scheme == "symmetric")  # symmetric: offset = -zero * scale
    scales = packed.scales.float()
    offsets = packed.offsets if packed.offsets is not None else -packed.zero * scales
    rebuilt = (values.reshape(48, scales.shape[1], -1) * scales[..., None] + offsets[..., None]).reshape(48, 128)
    torch.testing.assert_close(rebuilt, dequantize(t), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.dequantize(), dequantize(t), rtol=0, atol=1e-5)


def test_float16_scales_are_what_the_values_were_rounded_against():
    w = _weight() * 1e-3  # small weights: float16 scales near the bottom of their range
    t = quantize(w, QuantSpec(4, "symmetric", "group", 32, "float16"))
    assert torch.equal(t.scale, t.scale.half().float())
    assert float((dequantize(t) - w).abs().max()) <= float(t.scale.abs().max()) + 1e-9  # [-8, 7]: one step


def test_bad_specs_and_shapes_are_refused():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(granularity="group")
    with pytest.raises(ValueError, match="not a multiple of group_size"):
        quantize(torch.randn(2, 48), QuantSpec(8, "symmetric", "group", 32))
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(2, 2, 2), QuantSpec())
