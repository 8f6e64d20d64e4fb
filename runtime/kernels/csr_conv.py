"""Conv layers with CSR weights: forward (and its plans) and grad_input.

The weight is the O x (C*kh*kw) CSR of ``csr_gather.py``'s contract. Each call
checks its arguments once, then takes one of two paths: the gather kernel on phase
planes (``csr_gather.py``; grad_input regroups the nonzeros by input channel and
phase first, ``csr_transpose.py``), or, at very low density, the direct path
(``csr_direct.py``, which says when). Results equal the dense kernels'
(``conv.py``) to float32 rounding.

Plans, fused bias and ReLU (inference)
--------------------------------------
``plan_conv2d_forward`` does once what every forward call otherwise repeats:
validate the CSR, pick the path, lay out the taps' planes and offsets. Frozen
layers (``runtime/inference.py``) keep one per input shape and call
``ConvForwardPlan.run``; ResNet-18 at 99 % (global), batch 1: the 256@8x8 ->
512 1x1 stride-2 layer (45k nonzeros) took 0.53 ms a call, of which 0.12 ms
was the kernel; the rest was checks and a per-nonzero gather of plane and
offset, which the kernel now reads per tap (CSR column) instead. The bias is
added, and a following ReLU applied (max(v, 0) with NaN kept), as the kernels
write each output: one pass over the activations fewer for each. Whole eval
forward, frozen, batch 1: 4.4 ms -> 2.2-2.3 ms (with the BasicBlock's last ReLU
in place, ``python tools/bench/onnx_speed.py``).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..arrays import as_f32, check_ndim
from ..errors import ConfigError, ShapeError
from . import conv_planes, csr_direct, csr_transpose
from .csr_gather import NO_BIAS, chunk, csr_args, each, gather_taps
from .geometry import cdiv, out_size


def _kshape(kshape, what: str) -> tuple:
    if len(kshape) != 4 or min(kshape) < 0 or min(kshape[2:]) < 1:
        raise ConfigError(f"{what}: expected kshape (O, C, kh, kw) with kh, kw >= 1, "
                          f"got {tuple(kshape)}")
    return tuple(int(k) for k in kshape)


def _geometry(h: int, w: int, kh: int, kw: int, stride, pad, what: str):
    """(oh, ow) of the conv; ConfigError for a stride, pad or kernel that cannot run."""
    if int(stride) != stride or stride < 1 or int(pad) != pad or pad < 0:
        raise ConfigError(f"{what}: expected integer stride >= 1 and pad >= 0, got "
                          f"stride={stride}, pad={pad}")
    if h + 2 * pad < kh or w + 2 * pad < kw:
        raise ConfigError(f"{what}: expected a padded input of at least {kh}x{kw}, "
                          f"got {h}x{w} with pad {pad}; lower the kernel or pad more")
    return out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)


def csr_conv2d_forward(x: np.ndarray, data, indices, indptr, kshape: tuple,
                       stride: int, pad: int, bias: np.ndarray | None = None
                       ) -> np.ndarray:
    """y = conv(x, w) (+ b) with w in CSR; same result as ``conv.conv2d_forward``
    followed by ``y += b``.

    Wraps ``csr_direct.forward`` at low density (``csr_direct.use_direct``), else
    ``gather_taps`` on phase planes (groups = output channels); the bias is added
    as each output is written, not in a second pass. A caller that runs the same
    weights on the same input shape again keeps a ``ConvForwardPlan`` instead.

    Parameters
    ----------
    x : (N, C, H, W) float32 (converted once if not C-contiguous float32)
    data, indices, indptr : CSR of w as the O x (C*kh*kw) matrix (f4, i4, i8)
    kshape : (O, C, kh, kw), the dense weight shape
    stride, pad : ints, stride >= 1, pad >= 0 (both axes)
    bias : (O,) float32 or None

    Returns
    -------
    y : (N, O, OH, OW) float32
    """
    return _conv_forward(x, data, indices, indptr, kshape, stride, pad, "auto", bias)


def _conv_forward(x, data, indices, indptr, kshape, stride, pad, path: str,
                  bias=None):
    """csr_conv2d_forward on a given path: "auto", "planes" or "direct"."""
    what = "csr_conv2d_forward"
    # writable: conv_planes._phases has no read-only signature (decoded buffers
    # are read-only)
    x = np.require(as_f32(x, f"{what}: x"), requirements=["W"])
    check_ndim(x, 4, what, "(N, C, H, W)")
    plan = plan_conv2d_forward(data, indices, indptr, kshape, x.shape, stride, pad,
                               path)
    return plan.run(x, None if bias is None else as_f32(bias, f"{what}: bias"))


class ConvForwardPlan(NamedTuple):
    """A CSR conv forward for one weight and one input shape, validated and laid
    out once: the checks, the path choice and the tap layout cost 0.1-0.4 ms a
    call at batch 1 (ResNet-18, 99 %), more than the MACs; frozen inference
    layers keep one per input shape (``plan_conv2d_forward``)."""

    in_shape: tuple
    out_shape: tuple
    kshape: tuple
    stride: int
    pad: int
    path: str  # "zeros" (no nonzero or an empty shape), "direct" or "planes"
    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    taps: tuple  # planes path: (sph, spw, hq, wq, plane and offset per tap, box)

    def run(self, x: np.ndarray, bias: np.ndarray | None = None,
            relu: bool = False) -> np.ndarray:
        """y (N, O, OH, OW) f4 of x, which must have ``in_shape`` (f4, C-contiguous,
        writable: ``np.require(x, np.float32, ["C", "W"])``); ``relu`` applies
        max(y, 0) as y is written (NaN kept, as np.maximum)."""
        what = "csr_conv2d_forward"
        if x.shape != self.in_shape or x.dtype != np.float32 or \
                not x.flags.c_contiguous or not x.flags.writeable:
            raise ShapeError(f"{what}: expected a writable C-contiguous float32 x of "
                             f"shape {self.in_shape} (the plan's), got {x.dtype} "
                             f"{x.shape}")
        o = self.kshape[0]
        if bias is None:
            bias = NO_BIAS
        elif bias.shape != (o,) or bias.dtype != np.float32:
            raise ShapeError(f"{what}: expected a float32 bias of shape ({o},), got "
                             f"{bias.dtype} {bias.shape}")
        if self.path == "zeros":  # every output is its channel's bias (or 0)
            if not bias.shape[0]:
                return np.zeros(self.out_shape, dtype=np.float32)
            y = np.empty(self.out_shape, dtype=np.float32)
            y[...] = (np.maximum(bias, np.float32(0.0)) if relu else bias)[
                None, :, None, None]
            return y
        n, c, h, wd = self.in_shape
        _, _, kh, kw = self.kshape
        s, p = self.stride, self.pad
        y = np.empty(self.out_shape, dtype=np.float32)
        oh, ow = self.out_shape[2:]
        if self.path == "direct":
            csr_direct.forward(x.reshape(-1), self.indices, self.indptr, self.data, n,
                               c, h, wd, kh, kw, s, p, oh, ow, bias, relu,
                               y.reshape(-1))
            return y
        sph, spw, hq, wq, plane, off, box = self.taps
        xs = conv_planes.planes(x, s, sph, spw, p, p, hq, wq)
        size = hq * wq
        gather_taps(xs, self.indptr, self.indices, plane, off, self.data, size, wq,
                    chunk(n, size), 1, box, bias, relu, y)
        return y



def plan_conv2d_forward(data, indices, indptr, kshape: tuple, in_shape: tuple,
                        stride: int, pad: int, path: str = "auto") -> ConvForwardPlan:
    """The ``ConvForwardPlan`` of w (CSR, as ``csr_conv2d_forward``) on inputs of
    ``in_shape`` (N, C, H, W); ``path`` "auto" (``csr_direct.use_direct``), "planes" or
    "direct". Raises as csr_conv2d_forward does for bad arguments."""
    what = "csr_conv2d_forward"
    if path not in ("auto", "planes", "direct"):
        raise ConfigError(f"{what}: expected path auto, planes or direct, got {path!r}")
    o, c, kh, kw = _kshape(kshape, what)
    if len(in_shape) != 4 or in_shape[1] != c:
        raise ShapeError(f"{what}: expected x with C={c} channels (kshape {kshape}), "
                         f"got {tuple(in_shape)}")
    data, indices, indptr = csr_args(data, indices, indptr, (o, c * kh * kw), what)
    n, _, h, wd = (int(d) for d in in_shape)
    oh, ow = _geometry(h, wd, kh, kw, stride, pad, what)
    s, p = int(stride), int(pad)
    shapes = ((n, c, h, wd), (n, o, oh, ow), (o, c, kh, kw), s, p)
    if data.shape[0] == 0 or n == 0 or o == 0:
        return ConvForwardPlan(*shapes, "zeros", data, indices, indptr, ())
    hq, wq = cdiv(h + 2 * p, s), cdiv(wd + 2 * p, s)
    if path == "auto":
        copied = c * min(s, kh) * min(s, kw) * hq * wq  # phase planes, per image
        path = ("direct" if csr_direct.use_direct(data.shape[0], oh * ow, copied,
                                                  "forward") else "planes")
    if path == "direct":
        return ConvForwardPlan(*shapes, "direct", data, indices, indptr, ())
    sph, spw, plane, off, order = conv_planes.forward_taps(c, kh, kw, s, wq)
    tap_plane = np.empty_like(plane)
    tap_off = np.empty_like(off)
    tap_plane[order] = plane  # back to the (c, i, j) column order of the CSR
    tap_off[order] = off
    box = np.array([[0, oh, 0, ow, 0, 0]], dtype=np.int64)
    taps = (sph, spw, hq, wq, tap_plane, tap_off, box)
    return ConvForwardPlan(*shapes, "planes", data, indices, indptr, taps)


def csr_conv2d_grad_input(grad_out: np.ndarray, data, indices, indptr,
                          kshape: tuple, in_shape: tuple, stride: int,
                          pad: int) -> np.ndarray:
    """dL/dx (N, C, H, W) f4 from grad_out and w in CSR; = ``conv.conv2d_grad_input``.

    Wraps ``csr_direct.grad_input`` at low density (``csr_direct.use_direct``),
    else ``csr_transpose.transposed`` and ``gather_taps`` polyphase (module
    docstrings).

    Parameters
    ----------
    grad_out : (N, O, OH, OW) float32
    data, indices, indptr : CSR of w as the O x (C*kh*kw) matrix (f4, i4, i8)
    kshape : (O, C, kh, kw); in_shape : (N, C, H, W) of the layer input
    stride, pad : as in the forward call
    """
    return _conv_grad_input(grad_out, data, indices, indptr, kshape, in_shape, stride,
                            pad, "auto")


def _conv_grad_input(grad_out, data, indices, indptr, kshape, in_shape, stride, pad,
                     path: str):
    """csr_conv2d_grad_input on a given path: "auto", "planes" or "direct"."""
    what = "csr_conv2d_grad_input"
    g = np.require(as_f32(grad_out, f"{what}: grad_out"), requirements=["W"])
    o, c, kh, kw = _kshape(kshape, what)
    if len(in_shape) != 4 or in_shape[1] != c:
        raise ShapeError(f"{what}: expected in_shape (N, {c}, H, W), got {in_shape}")
    n, _, h, wd = (int(d) for d in in_shape)
    oh, ow = _geometry(h, wd, kh, kw, stride, pad, what)
    if g.shape != (n, o, oh, ow):
        raise ShapeError(f"{what}: expected grad_out of shape {(n, o, oh, ow)}, got "
                         f"{g.shape}")
    data, indices, indptr = csr_args(data, indices, indptr, (o, c * kh * kw), what)
    s, p = int(stride), int(pad)
    if data.shape[0] == 0 or n * c * h * wd == 0:
        return np.zeros((n, c, h, wd), dtype=np.float32)
    if path == "auto":
        path = ("direct" if csr_direct.use_direct(data.shape[0], oh * ow, o * oh * ow,
                                                  "grad_input") else "planes")
    if path == "direct":
        return csr_direct.grad_input(g, data, indices, indptr, (o, c, kh, kw),
                                     (n, c, h, wd), s, p)
    # rows a of phase pi of the padded dL/dx that land inside x: [r0, r1); the
    # grid starts at the first such row of any phase (a - rmin), so that stride 1
    # gets the tight (H + kh - 1) x (W + kw - 1) grid of conv.py's flipped-kernel
    # path, not the padded (H + 2p + kh - 1) one
    hq, wq = cdiv(h + 2 * p, s), cdiv(wd + 2 * p, s)
    rows = [_phase_range(pi, s, p, h, hq) for pi in range(s)]
    cols = [_phase_range(pj, s, p, wd, wq) for pj in range(s)]
    rmin, rmax = min(r[0] for r in rows), max(r[1] for r in rows)
    qmin, qmax = min(q[0] for q in cols), max(q[1] for q in cols)
    box = np.array([(r0 - rmin, r1 - rmin, q0 - qmin, q1 - qmin,
                     s * rmin + pi - p, s * qmin + pj - p)
                    for pi, (r0, r1) in enumerate(rows)
                    for pj, (q0, q1) in enumerate(cols)], dtype=np.int64)
    # phase row a reads grad_out row a - i//s: grid row a - rmin + dr - i//s
    dr, dc = (kh - 1) // s, (kw - 1) // s
    hg, wg = rmax - rmin + dr, qmax - qmin + dc
    gs = conv_planes.planes(g, 1, 1, 1, dr - rmin, dc - qmin, hg, wg)  # < 0 pads crop
    ii = np.arange(kh)[None, :, None]
    jj = np.arange(kw)[None, None, :]
    group = np.arange(c)[:, None, None] * (s * s) + (ii % s) * s + jj % s
    col_off = np.broadcast_to((dr - ii // s) * wg + (dc - jj // s), group.shape)
    gptr, grow, goff, gval = csr_transpose.transposed(data, indices, indptr,
                                                      group.ravel(), col_off.ravel(),
                                                      c * s * s)
    grad_x = np.empty((n, c, h, wd), dtype=np.float32)
    size = hg * wg
    gather_taps(gs, gptr, each(gval), grow, goff, gval, size, wg, chunk(n, size), s,
                box, NO_BIAS, False, grad_x)
    return grad_x



def csr_conv2d_macs(indices, indptr, kshape: tuple, in_shape: tuple, stride: int,
                    pad: int, n_images: int) -> int:
    """Multiply-adds the direct path executes for one call (forward or grad_input).

    Exactly the valid taps: sum over the nonzeros (o, c, i, j) of n_images *
    rows(i) * cols(j), rows(i) = #{a < OH : 0 <= a*s - p + i < H} (cols alike), so
    border taps count less than OH * OW. ``in_shape`` ends with (H, W).
    """
    _, _, kh, kw = _kshape(kshape, "csr_conv2d_macs")
    h, wd = (int(d) for d in in_shape[-2:])
    oh, ow = _geometry(h, wd, kh, kw, stride, pad, "csr_conv2d_macs")
    s, p = int(stride), int(pad)
    rows = np.array([np.subtract(*csr_direct.valid(i, s, p, h, oh)[::-1])
                     for i in range(kh)])
    cols = np.array([np.subtract(*csr_direct.valid(j, s, p, wd, ow)[::-1])
                     for j in range(kw)])
    col = np.asarray(indices, dtype=np.int64)[:int(np.asarray(indptr)[-1])]
    per_image = rows[col // kw % kh] * cols[col % kw]
    return int(n_images) * int(per_image.sum())


def _phase_range(pi: int, s: int, p: int, size: int, num: int) -> tuple:
    """[a0, a1): the rows s*a + pi of a padded axis (of num phase rows) inside x."""
    a0 = max(0, -(-(p - pi) // s))
    return a0, max(a0, min(num, (size - 1 + p - pi) // s + 1))
