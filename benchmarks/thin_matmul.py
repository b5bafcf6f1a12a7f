"""Milliseconds of LoRA's four rank-r products, in the two orders that give the same numbers.

Each of them has r = 8 rows or columns, a thin matrix, and BLAS libraries tune their kernels
for square-ish ones: the same product, computed as its transpose (``C = (B^T A^T)^T``, the same
numbers), can take a different time. ``lora/fused.py`` computes each with r as the rows.

    python -m benchmarks.thin_matmul                       # SmolLM2's q_proj: 1024 tokens, 576 in, 576 out, r 8
    python -m benchmarks.thin_matmul --out 192             # its v_proj
"""

import argparse
import statistics
import sys

import torch

from benchmarks.lora_step import timed


def products(x, g, A, B):
    """Each rank-r product of the LoRA layer two ways: with r as the columns of the result, and as its rows."""
    xa, gb = x @ A.T, g @ B  # (tokens, r)
    return {
        "x A^T, (tokens, r)": (lambda: x @ A.T, lambda: (A @ x.T).T),
        "g B, (tokens, r)": (lambda: g @ B, lambda: (B.T @ g.T).T),
        "dA = (g B)^T x, (r, in)": (lambda: (x.T @ gb).T, lambda: gb.T @ x),
        "dB = g^T (x A^T), (out, r)": (lambda: g.T @ xa, lambda: (xa.T @ g).T),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.thin_matmul", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024, help="(%(default)s)")
    parser.add_argument("--in", dest="d_in", type=int, default=576, help="(%(default)s)")
    parser.add_argument("--out", dest="d_out", type=int, default=576, help="(%(default)s)")
    parser.add_argument("--r", type=int, default=8, help="(%(default)s)")
    parser.add_argument("--repeats", type=int, default=200, help="calls per timing; the median of 7 (%(default)s)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{device}, {torch.get_num_threads()} threads; tokens {args.tokens}, in {args.d_in}, out {args.d_out}, "
          f"r {args.r}; ms per call, median of 7 timings of {args.repeats} calls")
    print("| product | dtype | r as columns | r as rows | rows / columns |")
    print("| --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.bfloat16):
        generator = torch.Generator().manual_seed(0)
        x, g, A, B = (torch.randn(*shape, generator=generator).to(device, dtype) for shape in
                      ((args.tokens, args.d_in), (args.tokens, args.d_out), (args.r, args.d_in), (args.d_out, args.r)))
        for name, (columns, rows) in products(x, g, A, B).items():
            ms = []
            for function in (columns, rows):
                for _ in range(10):  # warm-up
                    function()
                times = [timed(lambda: [function() for _ in range(args.repeats)], device) for _ in range(7)]
                ms.append(statistics.median(times) / args.repeats * 1e3)
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {ms[0]:.3f} | {ms[1]:.3f} | {ms[1] / ms[0]:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
