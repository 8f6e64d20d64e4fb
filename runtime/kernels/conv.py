"""The dense convolution: a direct ("shifted-row") convolution in Numba, no BLAS.

Layout contract: ``x`` is C-contiguous float32 (N, C, H, W), weights (O, C, kh, kw)
as in PyTorch. (An earlier im2col + BLAS version was removed: see "Measured" below
and the git history.)

Two layouts, one per kind of layer, each with its own module: narrow layers copy
the input into zero-padded phase planes and run tap loops over them
(``conv_planes.py``: forward, grad_weight, grad_input); layers whose kernel rows
are wide (kw*C floats, ``_use_rows``) copy it into channel-last rows and run dot
products of kw*C floats (``conv_rows.py``: forward, grad_input). This module is
the public API and that choice.

The kernels use Numba's thread pool (prange) and never call BLAS. That matters on
two cores: a Numba pool between OpenBLAS calls makes both pools wait (every call
then took a scheduler quantum, about 8 ms); with no BLAS in the conv path, the
only BLAS calls of a train step are the tiny Linear-layer matmuls, which OpenBLAS
runs single-threaded.

Memory: the phase planes and the channel-last rows are the size of the padded
input (about 1.1-1.6x the input), freed after each call; no 9x-sized column
matrix is built.

Measured (2026-12-03, the 2-core EPYC shared with other jobs, load 5-8 on 2
CPUs, so wall-clock medians of either framework moved 2x between runs): one
thread, minimum process CPU time of 10 calls, N=32, ``python tools/bench/conv.py
--set all --threads 1 --clock cpu --reps 10`` (torch 2.13, 1 thread); "before"
is this module at commit bec066d (planes only, grad_weight images back to back):

    shape (C, H, O, k, s)   fwd: before  now  torch | f+b: before   now   torch
    3   32  16 3 1                 1.19  1.18  0.87 |        4.52   4.56   4.99
    16  32  16 3 1                 3.81  3.63  4.00 |       12.47  10.91  12.24
    16  32  32 3 2                 2.92  2.74  1.65 |        9.75   9.63   9.38
    32  16  32 3 1                 3.60  3.22  2.27 |       11.04   9.84   7.51
    32  16  64 3 2                 2.70  1.65  1.17 |        8.79   6.65   5.25
    64   8  64 3 1                 5.48  2.34  2.05 |       17.32   8.27   9.72
    16  32  32 1 2                 1.20  0.84  0.64 |        5.10   4.38   4.83
    32  16  64 1 2                 0.56  0.65  0.44 |        2.23   2.11   2.85
    ResNet-8 set                  21.5  16.3  13.1  |        71.2   56.4   56.8
    64  32  64 3 1                43.3  37.2  37.5  |       129.8  123.2  125.4
    64  32 128 3 2                28.0  24.7  22.4  |        85.5   83.0   79.7
    128 16 128 3 1                43.3  33.9  38.2  |       130.9  112.3   95.4
    128 16 256 3 2                30.6  19.6  17.6  |        95.6   69.5   60.6
    256  8 256 3 1                54.0  35.9  31.4  |       159.1  116.1  103.1
    256  8 512 3 2                40.8  22.3  21.9  |       138.0   81.6   77.5
    512  4 512 3 1                93.3  37.9  35.9  |       260.7  131.2  158.7
    ResNet-18 set                333   212   205    |        1000    717    700

The row kernel runs 60-72 GFLOPS on one core at 64-512 channels (the planes'
tap loop 26-59, lowest at 4x4 where 56 % of the grid is padding). Whole train
steps, ``sparsefedpp bench --models resnet8 resnet18 --repeats 10 --threads 1``
(turns with torch, same load): ResNet-8 103 ms vs 94 (1.10x [1.09-1.11]),
inference 42 vs 20 (2.2x: the 3- and 16-channel layers stay on the planes, and
BatchNorm/ReLU are most of the rest); ResNet-18 4858 vs 5302 (0.95x [0.90-1.01]),
inference 1347 vs 1193 (1.01x). With 2 threads on that loaded machine torch's
spinning OpenMP threads lost more than ours (0.57x / 0.63x), so those ratios
say nothing about a quiet board; measure again there.

Tried and measured (single thread): row-kernel register blocks (outputs x
columns, GFLOPS at 64/128/256/512 channels) 4x2 64/57/64/61, 4x3 71/64/72/50
(3 columns waste a third at 4 px), 2x4 59/65/62/65, 3x4 34-37 (spills), 6x2
70/70/64/68 (kept). grad_weight blocked over t (1024-2048 floats) and output
pairs (16-64), so four taps' rows stay in L1: no steady gain (+13 % on two
stride-2 layers, -10-25 % on others), left out. The row kernel loses to the
planes below kw*C = 48-64 floats per dot product (3-channel stem, 16 channels
at stride 1): its twelve horizontal sums per kernel row cost as much as the
dots there. Earlier (planes): one output x 8 taps 50-57 GFLOPS; 2x4 63-81
(kept); 2x6 67-72; 4x2 41-56; one image per loop 26 at 8x8, hence the
multi-image chunks. Left: the channel-last and plane copies (3.6-4.9 ms per
64ch@32 input, single-threaded) are redone by forward and grad_weight of the
same layer; grad_weight is still 1.3-1.8x the forward's time; the flipped
weight transpose of grad_input costs 6.5 ms at 512x512x3x3.

The im2col + BLAS comparison of the first version (same table layout, 2 threads,
quiet run): im2col+BLAS f+b summed 80 ms over the ResNet-8 set against 38.9 for
the planes; ResNet-8 train step 135-175 ms against 86-99 (torch 41-52).
"""

import numpy as np

from . import conv_planes, conv_rows

# floats per dot product (kw*C) from which conv_rows beats the planes (measured;
# the planes' stride-2 path is slower, so strided layers switch earlier)
_ROWS_MIN = 64
_ROWS_MIN_STRIDED = 32


def _use_rows(width: int, stride: int) -> bool:
    """Whether conv_rows (dot products of `width` floats) beats the planes."""
    return width >= _ROWS_MIN or (stride > 1 and width >= _ROWS_MIN_STRIDED)


def conv2d_forward(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """y = conv(x, w): x (N, C, H, W) f4, w (O, C, kh, kw) f4 -> y (N, O, OH, OW) f4.

    Rows of kw*C floats that are wide enough (_use_rows) take conv_rows, narrower
    ones the phase planes."""
    if _use_rows(w.shape[3] * w.shape[1], stride):
        return conv_rows.forward(x, w, stride, pad)
    return conv_planes.forward(x, w, stride, pad)


def conv2d_grad_weight(x: np.ndarray, grad_out: np.ndarray, kshape: tuple,
                       stride: int, pad: int) -> np.ndarray:
    """dL/dw (O, C, kh, kw) f4 from the layer input x and grad_out (N, O, OH, OW)
    (on the phase planes, images side by side, for every layer)."""
    return conv_planes.grad_weight(x, grad_out, kshape, stride, pad)


def conv2d_grad_input(grad_out: np.ndarray, w: np.ndarray, in_shape: tuple,
                      stride: int, pad: int) -> np.ndarray:
    """dL/dx (N, C, H, W) f4 from grad_out (N, O, OH, OW) and the weights w.

    Stride 1: a convolution of grad_out with the flipped, transposed kernel.
    Stride s > 1: one stride-1 correlation per phase (pi, pj) of the padded input
    gradient, each written straight to rows s*r + pi - pad, columns s*q + pj - pad.
    Rows of kw*O floats that are wide enough (_use_rows) take conv_rows, narrower
    ones the phase planes.
    """
    o, _, _, kw = w.shape
    g = np.ascontiguousarray(grad_out, dtype=np.float32)
    if _use_rows(o * kw, stride):
        return conv_rows.grad_input(g, w, in_shape, stride, pad)
    return conv_planes.grad_input(g, w, in_shape, stride, pad)
