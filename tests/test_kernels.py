"""The compiled kernels (torch.ops.cpu_llm) against their PyTorch reference twins, on every
instruction set this host can run, odd shapes included; their shape checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cpu_llm import kernels
from cpu_llm.core.errors import ConfigError
from cpu_llm.formats import tiling
from cpu_llm.formats.quantlib import QuantSpec, kernel_weights, quantize

pytestmark = pytest.mark.skipif(not kernels.kernels_available(), reason="kernels not built")

ISAS = kernels.supported_isas() or ["none"]
SPECS = [QuantSpec(8, "symmetric", "channel"), QuantSpec(8, "symmetric", "group", 64, "float16"),
         QuantSpec(8, "affine", "group", 32), QuantSpec(4, "symmetric", "group", 32, "float16"),
         QuantSpec(4, "affine", "group", 64), QuantSpec(4, "symmetric", "channel")]
# (N, K): K not a multiple of 64 (an odd number of blocks), N of 1, N not a multiple of the grain.
SHAPES = [(80, 96), (1, 64), (17, 160), (33, 256)]


@pytest.fixture(params=ISAS)
def isa(request):
    best = kernels.current_isa()
    kernels.set_isa(request.param)
    yield request.param
    kernels.set_isa(best)


def _weight(n: int, k: int) -> torch.Tensor:
    torch.manual_seed(n * 1000 + k)
    return torch.randn(n, k) * 0.05


def _close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    scale = expected.abs().max().clamp(min=1.0)
    assert float((actual - expected).abs().max() / scale) < tol, float((actual - expected).abs().max())


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 64])
def test_integer_kernel_matches_reference(isa, spec, n, k, rows):
    if k % spec.group_size if spec.group_size else False:
        pytest.skip("group does not divide K")
    packed = kernel_weights(quantize(_weight(n, k), spec))
    x = torch.randn(rows, k) * torch.logspace(-2, 1, rows)[:, None]
    bias = torch.randn(n)
    for per_row in (False, True):
        expected = kernels.qlinear(x, packed, per_row, bias, use_kernel=False)
        _close(kernels.qlinear(x, packed, per_row, bias, use_kernel=True), expected)


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_fp32_compute_kernel_and_dequantize_match_reference(isa, spec, rows):
    n, k = 48, 192
    packed = kernel_weights(quantize(_weight(n, k), spec))
    x = torch.randn(rows, k)
    _close(kernels.woq_linear_f32(x, packed, None, use_kernel=True), x @ packed.dequantize().T)
    torch.testing.assert_close(kernels.dequantize_shared(packed, use_kernel=True), packed.dequantize(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("n,k", [(1, 8), (7, 100), (64, 2048), (5, 33)])
@pytest.mark.parametrize("rows", [1, 2, 4, 6])
def test_fp32_matvec_matches_torch(isa, n, k, rows):
    w, x, bias = torch.randn(n, k), torch.randn(rows, k), torch.randn(n)
    torch.testing.assert_close(kernels.linear_f32(x, w, bias), x @ w.T + bias, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k", [(1, 100), (7, 100), (64, 2048)])
def test_fp32_rows_are_bitwise_independent_of_their_batch(isa, n, k):
    """A row of x gets the same sums alone and among 8 (fp32 decode rows in continuous batching)."""
    w, batch = torch.randn(n, k), torch.randn(8, k)
    together = kernels.linear_f32(batch, w, None)
    for row in range(8):
        assert torch.equal(kernels.linear_f32(batch[row:row + 1], w, None)[0], together[row])


def test_each_row_is_bitwise_independent_of_its_batch(isa):
    packed = kernel_weights(quantize(_weight(40, 128), SPECS[3]))
    batch = torch.randn(9, 128) * torch.logspace(-2, 2, 9)[:, None]
    together = kernels.qlinear(batch, packed, False, None, use_kernel=True)
    for row in range(9):
        assert torch.equal(kernels.qlinear(batch[row:row + 1], packed, False, None, use_kernel=True)[0], together[row])


def test_isas_agree_closely():
    packed = kernel_weights(quantize(_weight(64, 512), SPECS[0]))
    x = torch.randn(3, 512)
    results = []
    for name in ISAS:
        kernels.set_isa(name)
        results.append(kernels.qlinear(x, packed, False, None, use_kernel=True))
    kernels.set_isa(ISAS[0])
    for other in results[1:]:
        _close(other, results[0], 1e-5)


TILEABLE = [spec for spec in SPECS if spec.scheme == "symmetric"]


@pytest.mark.parametrize("spec", TILEABLE, ids=str)
@pytest.mark.parametrize("n,k", SHAPES + [(48, 64), (28, 96)])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 64])
def test_tiled_kernel_matches_reference(isa, spec, n, k, rows):
    """Every ISA's tiled kernel (AVX-512 VNNI: 16 rows per dot product, AVX2: two halves of 8);
    partial last tiles and halves (N not a multiple of 16 or 8), odd block counts, grouped and
    per-row scales, int8 and int4."""
    if spec.group_size and k % spec.group_size:
        pytest.skip("group does not divide K")
    packed = kernel_weights(quantize(_weight(n, k), spec))
    tiles, scales = tiling.tile(packed)
    x = torch.randn(rows, k) * torch.logspace(-2, 1, rows)[:, None]
    bias = torch.randn(n)
    for per_row in (False, True):
        expected = kernels.qlinear(x, packed, per_row, bias, use_kernel=False)
        _close(kernels.qlinear_tiled(x, tiles, scales, packed.bits, n, per_row, bias), expected)


@pytest.mark.parametrize("spec", TILEABLE, ids=str)
@pytest.mark.parametrize("n", [1, 17, 48])
def test_tiling_round_trips_in_place_or_not_and_gathers_rows(spec, n):
    packed = kernel_weights(quantize(_weight(n, 128), spec))
    tiles, scales = tiling.tile(packed)
    back = tiling.untile(tiles, scales, packed.bits, n)
    assert torch.equal(back.qweight, packed.qweight) and torch.equal(back.scales, packed.scales)
    assert back.zero == packed.zero and back.offsets is None
    if packed.bits == 8:
        ids = torch.tensor([[0, n - 1], [n // 2, 0]])
        assert torch.equal(tiling.int8_rows(tiles, ids), packed.qweight[ids])
    copy = kernel_weights(quantize(_weight(n, 128), spec))
    in_place, _ = tiling.tile(copy, in_place=True)
    assert torch.equal(in_place, tiles)
    assert (in_place.data_ptr() == copy.qweight.data_ptr()) == (n % tiling.TILE == 0)  # no second copy


@pytest.mark.parametrize("widths", [(16, 32, 5), (16, 24, 8)])  # whole tiles stacked / through the row layout
def test_concatenated_tiles_compute_the_parts_side_by_side(widths):
    spec = TILEABLE[-1]
    parts = [tiling.TiledWeight(*tiling.tile(kernel_weights(quantize(_weight(n, 64), spec))), spec.bits, n)
             for n in widths]
    fused = tiling.concat(parts)
    x = torch.randn(3, 64)
    expected = torch.cat([kernels.qlinear_tiled(x, p.tiles, p.scales, p.bits, p.n, False, None) for p in parts], -1)
    assert fused.shape == (sum(widths), 64)
    torch.testing.assert_close(kernels.qlinear_tiled(x, fused.tiles, fused.scales, fused.bits, fused.n, False, None),
                               expected, rtol=0, atol=0)


def test_tiled_rows_are_bitwise_independent_of_their_batch(isa):
    for spec in TILEABLE:
        packed = kernel_weights(quantize(_weight(40, 128), spec))
        tiles, scales = tiling.tile(packed)
        batch = torch.randn(9, 128) * torch.logspace(-2, 2, 9)[:, None]
        together = kernels.qlinear_tiled(batch, tiles, scales, packed.bits, 40, False, None)
        for row in range(9):
            alone = kernels.qlinear_tiled(batch[row:row + 1], tiles, scales, packed.bits, 40, False, None)
            assert torch.equal(alone[0], together[row])


def test_affine_weights_are_not_tiled():
    packed = kernel_weights(quantize(_weight(16, 64), QuantSpec(8, "affine", "group", 32)))
    assert not tiling.can_tile(packed)
    with pytest.raises(ValueError, match="only symmetric int8/int4 weights can be tiled"):
        tiling.tile(packed)


def test_shape_and_type_errors_name_the_argument():
    packed = kernel_weights(quantize(_weight(16, 64), SPECS[0]))
    op = torch.ops.cpu_llm.qlinear
    with pytest.raises(RuntimeError, match="x has 32 columns but the weight has K = 64"):
        op(torch.randn(1, 32), packed.qweight, packed.scales, None, 8, 0.0, False, None)
    with pytest.raises(RuntimeError, match="x must be a contiguous float32"):
        op(torch.randn(1, 64).double(), packed.qweight, packed.scales, None, 8, 0.0, False, None)
    with pytest.raises(RuntimeError, match="bits must be 8 or 4"):
        op(torch.randn(1, 64), packed.qweight, packed.scales, None, 3, 0.0, False, None)
    with pytest.raises(RuntimeError, match="qweight must be a contiguous int8"):
        op(torch.randn(1, 64), packed.qweight.float(), packed.scales, None, 8, 0.0, False, None)
    with pytest.raises(RuntimeError, match="K must be a multiple of 32"):
        op(torch.randn(1, 48), torch.zeros(2, 48, dtype=torch.int8), torch.ones(2, 1), None, 8, 0.0, False, None)
    with pytest.raises(RuntimeError, match="offsets must be a contiguous float32 tensor shaped like scales"):
        op(torch.randn(1, 64), packed.qweight, packed.scales, torch.zeros(3), 8, 0.0, False, None)
    with pytest.raises(RuntimeError, match="bias must have 16 values"):
        op(torch.randn(1, 64), packed.qweight, packed.scales, None, 8, 0.0, False, torch.zeros(3))
    with pytest.raises(RuntimeError, match="set_isa: 'sse2' is not supported"):
        kernels.set_isa("sse2")
    tiles, scales = tiling.tile(packed)
    tiled = torch.ops.cpu_llm.qlinear_tiled
    with pytest.raises(RuntimeError, match=r"tiles must be a contiguous uint8 \[2, K x 16\] tensor for N = 17"):
        tiled(torch.randn(1, 64), tiles, scales, 8, 17, False, None)
    with pytest.raises(RuntimeError, match=r"scales must be a contiguous float32 or float16 \[1, groups, 16\]"):
        tiled(torch.randn(1, 64), tiles, scales[:, :, :8].contiguous(), 8, 16, False, None)
    with pytest.raises(RuntimeError, match="qlinear_tiled: x has 32 columns but the weight has K = 64"):
        tiled(torch.randn(1, 32), tiles, scales, 8, 16, False, None)


def test_ops_trace_into_compiled_graphs_through_their_fake_kernels():
    from torch.fx.experimental.proxy_tensor import make_fx

    packed = kernel_weights(quantize(_weight(16, 64), SPECS[0]))

    def fn(x, qweight, scales, weight):
        y = torch.ops.cpu_llm.qlinear(x, qweight, scales, None, 8, 0.0, False, None)
        return torch.ops.cpu_llm.linear_f32(y.relu(), weight, None)

    args = (torch.randn(2, 64), packed.qweight, packed.scales, torch.randn(8, 16))
    graph = make_fx(fn, tracing_mode="fake")(*args)
    assert "cpu_llm.qlinear" in graph.code and "cpu_llm.linear_f32" in graph.code
    torch.testing.assert_close(graph(*args), fn(*args))


def _import_ops_with(isa: str) -> subprocess.CompletedProcess:
    code = "from cpu_llm import kernels; print(kernels.current_isa(), kernels.supported_isas(), kernels.kernel_status())"
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, kernels.ISA_ENV: isa},
                          cwd=Path(__file__).resolve().parents[1] / "handlers", capture_output=True, text=True, timeout=120)


@pytest.mark.skipif("avx2" not in kernels.supported_isas(), reason="the kernels do not run on this CPU")
def test_cpu_llm_isa_forces_avx2_on_every_cpu_that_has_it():
    result = _import_ops_with("AVX2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "avx2" and "['avx2']" in result.stdout and "forced by CPU_LLM_ISA" in result.stdout


def test_cpu_llm_isa_this_cpu_cannot_run_is_an_error_naming_the_variable():
    result = _import_ops_with("sse9")
    assert result.returncode != 0
    assert "environment: CPU_LLM_ISA: 'sse9' is not an instruction set" in result.stderr


@pytest.mark.skipif(len(kernels.supported_isas()) < 2 or kernels.FORCED_ISA is not None,
                    reason="needs a CPU with more than AVX2, and CPU_LLM_ISA unset")
def test_the_configs_kernel_isa_lowers_the_isa_and_auto_restores_the_best(monkeypatch):
    best = kernels.current_isa()
    try:
        kernels.use_isa("avx2")
        assert kernels.current_isa() == "avx2"
        assert kernels.kernel_status() == "cpu_llm_kernels (avx2, forced by handler.kernel_isa)"
        kernels.use_isa("auto")
        assert kernels.current_isa() == best and "forced" not in kernels.kernel_status()
        monkeypatch.setattr(kernels._kernels, "supported_isas", lambda: ["avx2"])  # as on an AVX2-only host
        with pytest.raises(ConfigError, match=r"model-config.yaml: handler.kernel_isa: 'avx512-vnni' is not an "
                                              r"instruction set our kernels run on this CPU \(it runs: avx2"):
            kernels.use_isa("avx512-vnni")
    finally:
        kernels.set_isa(best)


@pytest.mark.skipif(len(kernels.supported_isas()) < 2, reason="needs a CPU with more than AVX2")
def test_cpu_llm_isa_wins_over_the_configs_kernel_isa():
    code = ("from cpu_llm import kernels; kernels.use_isa('avx512-vnni'); "
            "print(kernels.current_isa(), kernels.kernel_status())")
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, kernels.ISA_ENV: "avx2"},
                            cwd=Path(__file__).resolve().parents[1] / "handlers", capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "avx2" and "forced by CPU_LLM_ISA" in result.stdout
