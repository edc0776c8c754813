"""QuantizedLinear: the AVX2 kernels agree with the PyTorch reference, rows stay independent."""

from __future__ import annotations

import pytest
import torch

from cpu_llm import quantized_linear
from cpu_llm.quantize import FullPrecisionLinear
from cpu_llm.quantized_linear import KERNEL_MAX_ROWS, QuantizedLinear, kernel_status, replace_linears
from cpu_llm.quantlib import QuantSpec, dequantize, quantize

WOQ_SPECS = [QuantSpec(8, "symmetric", "channel"), QuantSpec(8, "affine", "group", 64),
             QuantSpec(4, "affine", "group", 32), QuantSpec(4, "symmetric", "channel")]
W8A8 = QuantSpec(8, "symmetric", "channel")


def _linear(k: int = 192, n: int = 80, bias: bool = True) -> torch.nn.Linear:
    torch.manual_seed(1)
    return torch.nn.Linear(k, n, bias=bias)


def _reference(layer: QuantizedLinear) -> QuantizedLinear:
    """The same layer forced onto the plain PyTorch path."""
    twin = QuantizedLinear.__new__(QuantizedLinear)
    twin.__dict__ = {**layer.__dict__}
    twin.use_kernel = False
    return twin


def test_the_kernels_are_built_for_this_torch():
    # make install builds kernels/; without them every quantized mode is slower than fp32.
    assert kernel_status() == "cpu_llm_kernels (AVX2)", kernel_status()


@pytest.mark.parametrize("spec", WOQ_SPECS, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8, KERNEL_MAX_ROWS + 5])
def test_woq_kernel_matches_dequantized_float_matmul(spec, rows):
    linear = _linear()
    layer = QuantizedLinear.from_linear(linear, spec)
    assert layer.use_kernel
    x = torch.randn(rows, 192)
    expected = x @ dequantize(quantize(linear.weight, spec)).T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_reference(layer)(x), expected, rtol=1e-4, atol=1e-4)


def test_w8a8_kernel_matches_reference_and_stays_close_to_float():
    linear = _linear(bias=False)
    layer = QuantizedLinear.from_linear(linear, W8A8, "w8a8")
    x = torch.randn(5, 192)
    y = layer(x)
    torch.testing.assert_close(y, _reference(layer)(x), rtol=1e-4, atol=1e-4)
    exact = linear(x).detach()
    assert float((y - exact).norm() / exact.norm()) < 0.02
    with pytest.raises(ValueError, match="w8a8 needs symmetric per-channel"):
        QuantizedLinear.from_linear(linear, QuantSpec(4, "affine", "group", 32), "w8a8")


@pytest.mark.parametrize("kind,spec", [("woq", WOQ_SPECS[0]), ("woq", WOQ_SPECS[2]), ("w8a8", W8A8)])
def test_a_row_gives_bitwise_the_same_result_alone_and_in_a_batch(kind, spec):
    layer = QuantizedLinear.from_linear(_linear(), spec, kind)
    batch = torch.randn(8, 192) * torch.logspace(-2, 2, 8)[:, None]  # rows of very different ranges
    together = layer(batch)
    for row in range(8):
        assert torch.equal(layer(batch[row:row + 1])[0], together[row])


def test_leading_dimensions_and_dtype_are_preserved():
    layer = QuantizedLinear.from_linear(_linear(), WOQ_SPECS[0])
    x = torch.randn(2, 3, 192)
    y = layer(x)
    assert y.shape == (2, 3, 80) and y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x.reshape(6, 192)).reshape(2, 3, 80))


def test_shapes_the_kernel_cannot_take_use_the_reference_path():
    odd = torch.nn.Linear(40, 16)  # 40 input columns: not a multiple of 32
    layer = QuantizedLinear.from_linear(odd, QuantSpec(8, "symmetric", "channel"))
    assert not layer.use_kernel
    x = torch.randn(2, 40)
    torch.testing.assert_close(layer(x), x @ dequantize(quantize(odd.weight, layer.spec)).T + odd.bias)


def test_without_the_extension_everything_still_computes(monkeypatch):
    monkeypatch.setattr(quantized_linear, "_kernels", None)
    assert kernel_status().startswith("reference")
    linear = _linear()
    layer = QuantizedLinear.from_linear(linear, WOQ_SPECS[2])
    assert not layer.use_kernel
    x = torch.randn(2, 192)
    torch.testing.assert_close(layer(x), x @ dequantize(quantize(linear.weight, WOQ_SPECS[2])).T + linear.bias)


def test_replace_linears_skips_kept_layers_and_embeddings():
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 64), "proj": torch.nn.Linear(64, 64),
                                 "block": torch.nn.Sequential(torch.nn.Linear(64, 32)),
                                 "lm_head": FullPrecisionLinear(torch.nn.Linear(64, 10))})
    replaced = replace_linears(model, lambda name, linear: QuantizedLinear.from_linear(linear, W8A8))
    assert replaced == ["proj", "block.0"]
    assert isinstance(model["proj"], QuantizedLinear) and isinstance(model["block"][0], QuantizedLinear)
    assert isinstance(model["lm_head"], FullPrecisionLinear) and isinstance(model["embed"], torch.nn.Embedding)
