"""The native backend's layers: QuantizedLinear (both compute modes), QuantizedEmbedding and
FullPrecisionLinear agree with the PyTorch reference, and rows stay independent."""

from __future__ import annotations

import pytest
import torch

from cpu_llm import kernels
from cpu_llm.formats import tiling
from cpu_llm.formats.quantlib import QuantSpec, dequantize, kernel_weights, quantize
from cpu_llm.kernels import kernel_status
from cpu_llm.layers.quantized_linear import (KERNEL_MAX_ROWS, FullPrecisionLinear, QuantizedEmbedding, QuantizedLinear, replace_linears, tile_model)

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


def test_the_kernels_are_built_for_this_torch_and_pick_the_best_isa():
    # make install builds kernels/; without them every quantized mode is slower than fp32.
    flags = open("/proc/cpuinfo").read()
    best = "avx512-vnni" if all(f in flags for f in ("avx512bw", "avx512_vnni", "avx512vl", "avx512dq")) else "avx2"
    if kernels.FORCED_ISA:  # CI's AVX2 rerun on a host with more (CPU_LLM_ISA): the forced one, and said so
        assert kernel_status() == f"cpu_llm_kernels ({kernels.FORCED_ISA}, forced by {kernels.ISA_ENV})"
    else:
        assert kernel_status() == f"cpu_llm_kernels ({best})", kernel_status()


@pytest.mark.parametrize("spec", WOQ_SPECS, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8, KERNEL_MAX_ROWS + 5])
def test_woq_fp32_compute_matches_dequantized_float_matmul(spec, rows):
    linear = _linear()
    layer = QuantizedLinear.from_linear(linear, spec, compute="fp32")
    assert layer.use_kernel
    x = torch.randn(rows, 192)
    expected = x @ dequantize(quantize(linear.weight, spec)).T + linear.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_reference(layer)(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", WOQ_SPECS, ids=str)
@pytest.mark.parametrize("rows", [1, 8, KERNEL_MAX_ROWS + 5])
def test_woq_int8_compute_matches_reference_and_stays_close_to_fp32_compute(spec, rows):
    linear = _linear()
    layer = QuantizedLinear.from_linear(linear, spec, compute="int8")
    x = torch.randn(rows, 192)
    y = layer(x)
    torch.testing.assert_close(y, _reference(layer)(x), rtol=1e-4, atol=1e-4)
    exact = x @ dequantize(quantize(linear.weight, spec)).T + linear.bias
    assert float((y - exact).detach().norm() / exact.norm()) < 0.01  # activations quantized per block of 32


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


@pytest.mark.parametrize("kind,spec,compute", [("woq", WOQ_SPECS[0], "fp32"), ("woq", WOQ_SPECS[2], "fp32"),
                                               ("woq", WOQ_SPECS[0], "int8"), ("woq", WOQ_SPECS[2], "int8"),
                                               ("w8a8", W8A8, "fp32")])
def test_a_row_gives_bitwise_the_same_result_alone_and_in_a_batch(kind, spec, compute):
    layer = QuantizedLinear.from_linear(_linear(), spec, kind, compute)
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


def test_shapes_the_kernel_cannot_take_use_the_reference_path_in_fp32():
    odd = torch.nn.Linear(40, 16)  # 40 input columns: not a multiple of 32
    layer = QuantizedLinear.from_linear(odd, QuantSpec(8, "symmetric", "channel"), compute="int8")
    assert not layer.use_kernel and layer.compute == "fp32"
    x = torch.randn(2, 40)
    torch.testing.assert_close(layer(x), x @ dequantize(quantize(odd.weight, layer.spec)).T + odd.bias)


def test_without_the_extension_everything_still_computes(monkeypatch):
    monkeypatch.setattr(kernels, "_kernels", None)
    assert kernel_status().startswith("reference") and "make install" in kernel_status()
    linear = _linear()
    for compute in ("fp32", "int8"):
        layer = QuantizedLinear.from_linear(linear, WOQ_SPECS[2], compute=compute)
        assert not layer.use_kernel
        x = torch.randn(2, 192)
        exact = x @ dequantize(quantize(linear.weight, WOQ_SPECS[2])).T + linear.bias
        torch.testing.assert_close(layer(x), exact, rtol=0.02, atol=0.02)


def test_quantized_embedding_gathers_scaled_int8_rows():
    table = torch.randn(100, 64)
    packed = kernel_weights(quantize(table, W8A8))
    embedding = QuantizedEmbedding(packed.qweight, packed.scales)
    ids = torch.tensor([[3, 99, 3], [0, 1, 2]])
    out = embedding(ids)
    assert out.shape == (2, 3, 64) and out.dtype == torch.float32
    torch.testing.assert_close(out, dequantize(quantize(table, W8A8))[ids])
    assert float((out - table[ids]).abs().max()) <= float(table.abs().max()) / 127


@pytest.mark.skipif(not kernels.kernels_available(), reason="kernels not built")
def test_tile_model_tiles_integer_layers_and_a_tied_embedding_reads_the_heads_tiles():
    table = torch.randn(96, 192)
    head = QuantizedLinear(kernel_weights(quantize(table, W8A8)), None, W8A8, "woq", "int8")
    embedding = QuantizedEmbedding(head.qweight, head.scales)
    fp32_compute = QuantizedLinear.from_linear(_linear(), WOQ_SPECS[0], compute="fp32")
    affine = QuantizedLinear.from_linear(_linear(), QuantSpec(8, "affine", "group", 32), compute="int8")
    model = torch.nn.ModuleList([embedding, head, fp32_compute, affine])
    ids, x = torch.tensor([[5, 95], [0, 17]]), torch.randn(3, 192)
    before = [embedding(ids), head(x), fp32_compute(x), affine(x)]
    assert tile_model(model) == 1  # fp32 compute and affine weights keep the row layout
    assert head.tiled and embedding.tiled and embedding.qweight is head.qweight  # one table, tiled in place
    assert not fp32_compute.tiled and not affine.tiled
    for a, b in zip(before, [embedding(ids), head(x), fp32_compute(x), affine(x)]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(head.packed.qweight, kernel_weights(quantize(table, W8A8)).qweight)
    assert "tiled" in repr(head)


@pytest.mark.parametrize("use_kernel", [False, True] if kernels.kernels_available() else [False])
def test_full_precision_linear_is_exact_on_either_path(use_kernel):
    linear = _linear()
    layer = FullPrecisionLinear(linear, use_kernel=use_kernel)
    for rows in (1, 3, 40):
        x = torch.randn(2, rows, 192)
        torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)


def test_replace_linears_skips_kept_layers_and_embeddings():
    model = torch.nn.ModuleDict({"embed": torch.nn.Embedding(10, 64), "proj": torch.nn.Linear(64, 64),
                                 "block": torch.nn.Sequential(torch.nn.Linear(64, 32)),
                                 "lm_head": FullPrecisionLinear(torch.nn.Linear(64, 10))})
    replaced = replace_linears(model, lambda name, linear: QuantizedLinear.from_linear(linear, W8A8))
    assert replaced == ["proj", "block.0"]
    assert isinstance(model["proj"], QuantizedLinear) and isinstance(model["block"][0], QuantizedLinear)
    assert isinstance(model["lm_head"], FullPrecisionLinear) and isinstance(model["embed"], torch.nn.Embedding)
