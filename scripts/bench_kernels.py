"""Time the native quantized-linear kernels against fp32 F.linear, one layer at a time.

    python scripts/bench_kernels.py [--threads 2]

For SmolLM2's layer shapes and 1..64 activation rows, prints microseconds per call of fp32
`F.linear`, the WoQ INT8 / INT4 kernels and the W8A8 kernel, and the weight bytes each reads
per second. Rows above `quantized_linear.KERNEL_MAX_ROWS` take the dequantize + float GEMM
path; that limit was set from these figures and whole-model prefill timings.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "handlers"))
from cpu_llm.formats.quantlib import QuantSpec  # noqa: E402
from cpu_llm.kernels import kernel_status  # noqa: E402
from cpu_llm.layers.quantized_linear import QuantizedLinear  # noqa: E402

SHAPES = [(1536, 576), (576, 1536), (576, 576), (49152, 576)]  # gate/up, down, q/o, lm_head
ROWS = [1, 4, 8, 16, 32, 64]


def per_call_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"kernels: {kernel_status()}; {args.threads} threads; us per call (weight GB/s read)")
    print(f"{'N x K':>12} {'rows':>5} {'fp32':>16} {'woq int8':>16} {'woq int4 g32':>16} {'w8a8':>16}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for n, k in SHAPES:
            linear = torch.nn.Linear(k, n, bias=False)
            layers = [QuantizedLinear.from_linear(linear, QuantSpec(8, "symmetric", "channel")),
                      QuantizedLinear.from_linear(linear, QuantSpec(4, "affine", "group", 32)),
                      QuantizedLinear.from_linear(linear, QuantSpec(8, "symmetric", "channel"), "w8a8")]
            for rows in ROWS:
                x = torch.randn(rows, k)
                repeats = max(5, int(2e8 / (n * k * 4)))
                cells = []
                for fn, nbytes in [(lambda: F.linear(x, linear.weight), 4 * n * k),
                                   (lambda: layers[0](x), n * k), (lambda: layers[1](x), n * k // 2),
                                   (lambda: layers[2](x), n * k)]:
                    us = per_call_us(fn, repeats)
                    cells.append(f"{us:8.1f} ({nbytes / us / 1e3:4.1f})")
                print(f"{f'{n}x{k}':>12} {rows:>5} " + " ".join(f"{c:>16}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
