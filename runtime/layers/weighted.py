"""The weighted layers, Conv2d and Linear: Powerprop weights and the sparse machinery."""

from __future__ import annotations

import numpy as np

from ..accounting import nbytes_of
from ..allocator import lazy_zeros, resident_bytes
from ..arrays import Where, as_f32, check_ndim
from ..errors import ConfigError, ShapeError, StateError
from ..kernels import (
    conv,
    csr_build,
    csr_conv,
    csr_linear,
    density,
    geometry,
    sparse_grad,
)
from ..sparsity import static_pattern
from ..sparsity.activations import ActivationSparsifier, SparseActivations
from ..sparsity.csr import CSRMatrix
from ..sparsity.static_pattern import DENSE, ZERO, StaticPattern
from . import powerprop
from .base import Layer, keeps_cache

KERNELS = ("auto", "dense", "csr")


class WeightedLayer(Layer):
    """Shared parts of Conv2d and Linear: Powerprop weight ``v``, optional bias, and
    the sparse machinery.

    Sparsity settings (all off by default, which is the plain dense layer):

    * ``sparsifier``: an ActivationSparsifier; backward then keeps only the top
      fraction of the input activations (SWAT), compressed, and computes the
      weight gradient from them. Set with ``sparsify_activations``.
    * ``weight_keep``: SWAT's forward weight sparsity (ZeroFL): the forward and
      grad_input use only this top fraction of |w|; the weight gradient stays dense.
    * ``kernel``: "auto" runs the CSR kernels when the weight density is below the
      measured crossover (kernels/density.py, ``prefer_csr``), "dense"/"csr" force one.

    Static pattern (runtime/sparsity/static_pattern.py): with alpha > 1, no ``weight_keep``
    and ``kernel`` "csr" (or "auto" below static_pattern.MAX_DENSITY), the first
    training forward keeps the CSR structure of v's nonzeros; later ones gather
    only the values, backward computes the weight gradient only there
    (kernels/sddmm.py) and the optimizer updates only there. Dropped by
    ``invalidate_pattern()``, which ``unfreeze()`` (so load_state_dict) calls, and
    whenever the weight array, kernel, alpha or weight_keep change.
    """

    _kind = ""

    def __init__(self, shape: tuple, fan_in: int, bias: bool, alpha: float,
                 rng: np.random.Generator | None):
        self.alpha = powerprop.check_alpha(alpha)
        rng = rng if rng is not None else np.random.default_rng()
        self.weight = powerprop.init_weight(shape, fan_in, self.alpha, rng)
        # dL/dv: dense, plus values pending at a static pattern (see grad_weight)
        self._grad_dense = lazy_zeros(self.weight.shape)
        self._grad_vals: np.ndarray | None = None
        self._grad_vals_pat: StaticPattern | None = None
        self.bias = None
        self.grad_bias = None
        if bias:
            bound = 1.0 / np.sqrt(fan_in)  # PyTorch's default bias init
            self.bias = rng.uniform(-bound, bound, shape[0]).astype(np.float32)
            self.grad_bias = np.zeros_like(self.bias)
        self.sparsifier: ActivationSparsifier | None = None
        self.weight_keep: float | None = None
        self.kernel = "auto"
        self._frozen: tuple | None = None  # (w, CSR, bias) for inference, see freeze()
        self._frozen_macs: tuple = (None, 0)  # (input shape, MACs) while frozen
        self._frozen_plans: dict = {}  # input shape -> CSR forward plan while frozen
        self._fused_relu = False  # frozen with the ReLU after it applied here
        self._pattern: StaticPattern | None = None
        self._pattern_v = None  # the weight array the pattern was built from
        self._grad_support = ZERO  # where _grad_dense may be nonzero (static_pattern)

    @property
    def grad_weight(self) -> np.ndarray:
        """dL/dv as a dense array. At a static pattern backward keeps the gradient
        as values over the pattern and the dense array (lazily zero memory) is
        written only when this is read: a 99 %-sparse ResNet-18 then holds 0.4 MB
        of gradient, not 42.6. The optimizer reads the values (``grad_values``)."""
        self._flush_pattern_grad()
        return self._grad_dense

    def grad_resident_bytes(self) -> int:
        """Memory the weight gradient occupies now: the dense array's backed pages
        and the values pending at the pattern (not the dense array's size)."""
        pending = 0 if self._grad_vals is None else self._grad_vals.nbytes
        return resident_bytes(self._grad_dense) + pending

    def owns_grad(self, g: np.ndarray) -> bool:
        """Whether ``g`` is this layer's dense weight gradient (without flushing)."""
        return g is self._grad_dense

    def grad_values(self, pat: StaticPattern) -> np.ndarray:
        """dL/dv at ``pat``'s entries, (nnz,) f4; for the pattern that
        ``pattern_for_step`` returned (the gradient is zero outside it)."""
        out = self._grad_vals if self._grad_vals_pat is pat else None
        if self._grad_support is pat:
            held = self._grad_dense.reshape(-1)[pat.flat]
            out = held if out is None else held + out
        return np.zeros(pat.nnz, dtype=np.float32) if out is None else out

    def _flush_pattern_grad(self) -> None:
        vals, pat = self._grad_vals, self._grad_vals_pat
        if vals is None:
            return
        self._grad_vals = self._grad_vals_pat = None
        self._grad_dense.reshape(-1)[pat.flat] += vals
        self._grad_support = (pat if self._grad_support is ZERO
                              or self._grad_support is pat else DENSE)

    def freeze(self, scale: np.ndarray | None = None,
               shift: np.ndarray | None = None, relu: bool = False) -> None:
        """Build this layer's inference weight once (dense or CSR, as ``kernel``
        picks), optionally folding a per-output affine map y' = scale*y + shift
        (an eval-mode BatchNorm) into it and, with ``relu``, the ReLU after it
        (applied as the output is written); eval forwards then reuse it instead of
        rebuilding the CSR from v every call. ``runtime.inference.freeze`` calls
        this; a training forward raises until ``unfreeze()``.
        """
        self.unfreeze()
        w, _, m, _ = self._forward_weight(False)
        bias = None if self.bias is None else self.bias.astype(np.float64)
        if scale is not None:
            scale = np.asarray(scale, dtype=np.float64)
            if m is None:
                w = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            else:
                row = np.repeat(scale, np.diff(m.indptr))
                m = m.with_data((m.data * row).astype(np.float32))
            bias = (np.zeros(len(scale)) if bias is None else bias) * scale + shift
        self._frozen = (w, m, None if bias is None else bias.astype(np.float32))
        self._fused_relu = bool(relu)

    def unfreeze(self) -> None:
        """Back to training; also drops the static pattern (load_state_dict and
        ``runtime.inference`` call this whenever v may have changed)."""
        self._frozen, self._frozen_macs, self._frozen_plans = None, (None, 0), {}
        self._fused_relu = False
        self.invalidate_pattern()

    # ---- static pattern (runtime/sparsity/static_pattern.py) -----------------------------

    def invalidate_pattern(self) -> None:
        """Forget the static pattern: the next training forward rebuilds it from v.
        Call it after writing nonzeros into ``weight`` in place (zeros need not:
        a pattern that is a superset of the nonzeros stays exact)."""
        self._pattern = None
        self._pattern_v = None

    @property
    def static_pattern(self) -> StaticPattern | None:
        """The pattern in use, if it is still valid for the current settings."""
        pat = self._pattern
        if pat is None:
            return None
        if (self._pattern_v is not self.weight or self.kernel != pat.kernel
                or self.alpha != pat.alpha or self.weight_keep is not None):
            self.invalidate_pattern()
            return None
        return pat

    def pattern_for_step(self) -> StaticPattern | None:
        """The pattern an optimizer may update alone (a valid one, with grad_weight
        zero outside it), else None."""
        pat = self.static_pattern
        if pat is None or not (self._grad_support is ZERO or self._grad_support is pat):
            return None
        if self._grad_vals is not None and self._grad_vals_pat is not pat:
            return None
        return pat

    def _may_use_pattern(self) -> bool:
        v = self.weight
        return (self.alpha != 1.0 and self.weight_keep is None
                and self.kernel in ("auto", "csr") and v.dtype == np.float32
                and v.flags.c_contiguous and self._grad_dense.flags.c_contiguous
                and self._grad_dense.shape == v.shape)

    def _pattern_forward(self):
        """((w, dw_dv, CSR, pattern) from the static pattern, built now if the
        density qualifies, or None to take the per-step path; row counts of v
        when they were computed, else None)."""
        if not self._may_use_pattern():
            self.invalidate_pattern()
            return None, None
        pat = self.static_pattern
        v = self.weight
        if pat is None:
            counts = csr_build.weight_row_nnz(v)
            if not (self.kernel == "csr"
                    or int(counts.sum()) < static_pattern.MAX_DENSITY * v.size):
                return None, counts
            pat = static_pattern.build(v, counts, self.kernel, self.alpha)
            self._grad_support = static_pattern.support_after_rebuild(
                self.grad_weight, self._grad_support)
            self._pattern, self._pattern_v = pat, v
        static_pattern.register(self)  # every time: cheap, and right after a deepcopy
        data, dw_dv = pat.values(v)
        if self.kernel == "csr" or density.prefer_csr(pat.nnz / pat.size, self._kind):
            m = CSRMatrix.trusted(data, pat.indices, pat.indptr,
                                 (v.shape[0], pat.size // v.shape[0]), v.shape)
            return (None, dw_dv, m, pat), None
        w = np.zeros(v.shape, dtype=np.float32)  # e.g. Linear: dense forward
        w.reshape(-1)[pat.flat] = data
        return (w, dw_dv, None, pat), None

    def _accumulate_pattern_grad(self, grad_vals: np.ndarray, dw_dv: np.ndarray,
                                 pat: StaticPattern) -> None:
        """grad_weight += dL/dv at the pattern (grad_vals: dL/dw there, (nnz,), a
        fresh array): kept as values while the dense array is zero."""
        grad_vals *= dw_dv
        if self._grad_support is ZERO and self._grad_vals is None:
            self._grad_vals, self._grad_vals_pat = grad_vals, pat
            return
        if self._grad_support is ZERO and self._grad_vals_pat is pat:
            self._grad_vals += grad_vals
            return
        self.grad_weight.reshape(-1)[pat.flat] += grad_vals
        if self._grad_support is ZERO or self._grad_support is pat:
            self._grad_support = pat
        else:
            self._grad_support = DENSE

    def zero_grad(self) -> None:
        self._grad_vals = self._grad_vals_pat = None
        support = self._grad_support
        if isinstance(support, StaticPattern):  # zero outside it already: O(nnz)
            self._grad_dense.reshape(-1)[support.flat] = 0.0
        elif support is DENSE:  # ZERO: untouched, and filling would back every page
            self._grad_dense.fill(0.0)
        if self.grad_bias is not None:
            self.grad_bias.fill(0.0)
        self._grad_support = ZERO

    def _frozen_plan(self, x: np.ndarray, m) -> csr_conv.ConvForwardPlan:
        """The CSR forward plan of the frozen weight for x's shape, built once (a
        Linear runs as a 1x1 conv of 1x1 images: x (N, I, 1, 1))."""
        plan = self._frozen_plans.get(x.shape)
        if plan is None:
            if len(self._frozen_plans) >= 8:  # many shapes seen: keep the latest
                self._frozen_plans.clear()
            kshape = self.weight.shape + (1,) * (4 - self.weight.ndim)
            plan = self._frozen_plans[x.shape] = csr_conv.plan_conv2d_forward(
                m.data, m.indices, m.indptr, kshape, x.shape,
                getattr(self, "stride", 1), getattr(self, "padding", 0))
        return plan

    @property
    def frozen(self) -> bool:
        return self._frozen is not None

    def _forward_bias(self) -> np.ndarray | None:
        return self.bias if self._frozen is None else self._frozen[2]

    def effective_weight(self) -> np.ndarray:
        """The weight used in the forward pass, w = v|v|^(alpha-1) (a copy if alpha>1)."""
        return powerprop.effective_weight(self.weight, self.alpha)[0]

    def sparsify_activations(self, keep: float | None, refresh_every: int = 0) -> None:
        """Keep only the top ``keep`` fraction of input activations for backward
        (None or 1.0: keep the dense input). The threshold is exact on the next
        batch, then reused; ``refresh_every`` > 0 recomputes it every that many
        batches, 0 only after ``reset_thresholds()``."""
        if keep is None or keep >= 1.0:
            self.sparsifier = None
            return
        sp = self.sparsifier
        if sp is not None and sp.refresh_every == refresh_every:
            sp.keep_fraction = keep  # a changed fraction forces a refresh
        else:
            self.sparsifier = ActivationSparsifier(keep, refresh_every)

    def reset_thresholds(self) -> None:
        """Recompute the activation threshold exactly on the next batch."""
        if self.sparsifier is not None:
            self.sparsifier.reset()

    def params(self):
        p = {"weight": self.weight}
        if self.bias is not None:
            p["bias"] = self.bias
        return p

    def grads(self):
        g = {"weight": self.grad_weight}
        if self.bias is not None:
            g["bias"] = self.grad_bias
        return g

    def _forward_weight(self, backward: bool):
        """(w or None, dw/dv or None, CSR of w or None, static pattern or None) for
        this forward pass.

        On the CSR path the CSR is built straight from v (kernels/csr_build.py,
        ``csr_of_weight``) and the dense w is formed only when a backward needs
        dw/dv; inference of a sparse model never touches the dense weights. A
        training forward with a static pattern takes only the values from v, and
        dw/dv is then (nnz,) at the pattern.
        """
        if self._frozen is not None:
            if backward:
                raise StateError(f"{self!r}: frozen for inference (its weight may "
                                 f"have a BatchNorm folded in); call "
                                 f"runtime.inference.unfreeze(model) before training")
            w, m, _ = self._frozen
            return w, None, m, None
        if self.kernel not in KERNELS:
            raise ConfigError(f"{self!r}.kernel: expected one of {KERNELS}, "
                              f"got {self.kernel!r}")
        counts = None
        if backward:
            found, counts = self._pattern_forward()
            if found is not None:
                return found
        v = self.weight
        keep = self.weight_keep
        if keep is not None and keep < 1.0:  # SWAT forward weights: top |w| only
            w, dw_dv = powerprop.effective_weight(v, self.alpha)
            mag = np.abs(w).ravel()
            k = max(1, round(keep * mag.size))
            if k < mag.size:
                mask = np.zeros(mag.size, dtype=np.float32)
                mask[np.argpartition(mag, mag.size - k)[mag.size - k:]] = 1.0
                w = w * mask.reshape(w.shape)
            use_csr = self.kernel == "csr" or (
                self.kernel == "auto" and density.prefer_csr(k / mag.size, self._kind))
            m = CSRMatrix.of_weight(w) if use_csr else None
            return w, dw_dv, m, None
        use_csr = self.kernel == "csr"
        if self.kernel == "auto":
            if counts is None:
                counts = csr_build.weight_row_nnz(v)
            use_csr = density.prefer_csr(int(counts.sum()) / v.size, self._kind)
        if not use_csr:
            w, dw_dv = powerprop.effective_weight(v, self.alpha)
            return w, dw_dv, None, None
        m = CSRMatrix.of_weight(v, self.alpha, counts)
        w = dw_dv = None
        if backward and self.alpha != 1.0:
            dw_dv = powerprop.effective_weight(v, self.alpha)[1]
        return w, dw_dv, m, None

    def _keep_input(self, x: np.ndarray, train, grad) -> object:
        """The input as backward will see it: dense, compressed top-k, or nothing."""
        if not keeps_cache(train, grad):
            return None
        if self.sparsifier is None:
            self.cost.act_keep = 1.0
            return x
        act = self.sparsifier.compress(x)
        self.cost.act_keep = act.kept / x.size if x.size else 1.0
        return act

    def _record_forward(self, x, y, w, dw_dv, m, act, pat=None):
        dense = int(y.size) * int(self.weight[0].size)
        self.cost.dense_macs_forward = dense
        if m is None:
            self.cost.macs_forward = dense
        elif y.ndim == 4 and pat is not None:  # counted once per input shape
            macs = pat.macs.get(x.shape)
            if macs is None:
                macs = pat.macs[x.shape] = csr_conv.csr_conv2d_macs(
                    m.indices, m.indptr, self.weight.shape, x.shape, self.stride,
                    self.padding, x.shape[0])
            self.cost.macs_forward = macs
        elif y.ndim == 4:  # the valid taps of the nonzeros (kernels/csr_conv.py)
            frozen = self._frozen is not None
            if not (frozen and self._frozen_macs[0] == x.shape):
                macs = csr_conv.csr_conv2d_macs(m.indices, m.indptr, self.weight.shape,
                                                x.shape, self.stride, self.padding,
                                                x.shape[0])
                self._frozen_macs = (x.shape if frozen else None, macs)
            self.cost.macs_forward = self._frozen_macs[1]
        else:
            self.cost.macs_forward = x.shape[0] * m.nnz
        self.cost.kernel = "dense" if m is None else "csr"
        held = 0 if act is None else nbytes_of(act)
        self._set_cache(None if act is None else (act, w, m, dw_dv, pat),
                        held=held, dense=0 if act is None else x.nbytes)

    def _accumulate_weight_grad(self, grad_w: np.ndarray, dw_dv) -> None:
        if dw_dv is not None:
            grad_w *= dw_dv
        dense = self.grad_weight
        dense += grad_w
        self._grad_support = DENSE


class Conv2d(WeightedLayer):
    """2-D convolution, groups=1, optionally Powerprop (alpha > 1) and sparse.

    y[n, o] = sum_c w[o, c] (*) x[n, c] + b[o], with w = v|v|^(alpha-1).
    x: (N, C, H, W) f4 -> y: (N, O, OH, OW) f4; weight ``v``: (O, C, kh, kw).
    See https://pytorch.org/docs/stable/generated/torch.nn.Conv2d.html
    """

    _kind = "conv"

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: int = 0, bias: bool = True,
                 alpha: float = 1.0, rng: np.random.Generator | None = None):
        for name, val, low in (("in_channels", in_channels, 1),
                               ("out_channels", out_channels, 1),
                               ("kernel_size", kernel_size, 1), ("stride", stride, 1),
                               ("padding", padding, 0)):
            if int(val) != val or val < low:
                raise ConfigError(f"Conv2d {name}: expected an integer >= {low}, "
                                  f"got {val!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        k = kernel_size
        super().__init__((out_channels, in_channels, k, k), in_channels * k * k,
                         bias, alpha, rng)

    def forward(self, x, train, grad=None):
        x = as_f32(x, Where(self, "forward"))
        what = Where(self, "forward")
        check_ndim(x, 4, what, f"(N, {self.in_channels}, H, W)")
        if x.shape[1] != self.in_channels:
            raise ShapeError(f"{what}: expected x of shape (N, {self.in_channels}, H, W),"
                             f" got {tuple(x.shape)}")
        k, p, s = self.kernel_size, self.padding, self.stride
        if x.shape[2] + 2 * p < k or x.shape[3] + 2 * p < k:
            raise ShapeError(f"{what}: expected an image of at least {k - 2 * p}x"
                             f"{k - 2 * p} pixels, got {x.shape[2]}x{x.shape[3]}")
        w, dw_dv, m, pat = self._forward_weight(keeps_cache(train, grad))
        bias = self._forward_bias()
        if m is None:
            y = conv.conv2d_forward(x, w, s, p)
            if bias is not None:
                y += bias[None, :, None, None]
            if self._fused_relu:
                np.maximum(y, np.float32(0.0), out=y)
        elif self._frozen is not None:
            y = self._frozen_plan(x, m).run(np.require(x, requirements=["W"]), bias,
                                            self._fused_relu)
        else:
            y = csr_conv.csr_conv2d_forward(x, m.data, m.indices, m.indptr,
                                            self.weight.shape, s, p, bias)
        self._record_forward(x, y, w, dw_dv, m, self._keep_input(x, train, grad), pat)
        return y

    def backward(self, grad_out, input_grad: bool = True):
        """``input_grad=False`` skips dL/dx (returns None): a model's first conv,
        whose input is the image, as PyTorch skips it for inputs without grad."""
        act, w, m, dw_dv, pat = self._take_cache()
        shape = act.shape
        g = as_f32(grad_out, Where(self, "backward"))
        n, _, h, wd = shape
        k, p, s = self.kernel_size, self.padding, self.stride
        oh, ow = geometry.out_size(h, k, s, p), geometry.out_size(wd, k, s, p)
        if g.shape != (n, self.out_channels, oh, ow):
            raise ShapeError(f"{self!r}.backward: expected grad_out of shape "
                             f"{(n, self.out_channels, oh, ow)}, got {tuple(g.shape)}")
        cost = self.cost
        kshape = self.weight.shape
        dense_macs = g.size * self.weight[0].size
        cost.dense_macs_grad_weight = cost.dense_macs_grad_input = dense_macs
        if pat is not None:
            grad_vals, cost.macs_grad_weight = static_pattern.conv_grad(pat, act, g,
                                                                        s, p)
            self._accumulate_pattern_grad(grad_vals, dw_dv, pat)
        elif isinstance(act, SparseActivations) and density.prefer_sparse_grad(
                act.kept / max(act.size, 1), k):
            grad_w, cost.macs_grad_weight = sparse_grad.conv2d_grad_weight_sparse_count(
                act.indices(), act.values, shape, g, kshape, s, p)
            self._accumulate_weight_grad(grad_w, dw_dv)
        else:
            if isinstance(act, SparseActivations):  # many kept: the dense kernel is faster
                act = act.to_dense()
            grad_w = conv.conv2d_grad_weight(act, g, kshape, s, p)
            cost.macs_grad_weight = dense_macs
            self._accumulate_weight_grad(grad_w, dw_dv)
        if self.bias is not None:
            self.grad_bias += g.sum(axis=(0, 2, 3))
        if not input_grad:
            cost.macs_grad_input = 0
            return None
        if m is None:
            cost.macs_grad_input = dense_macs
            return conv.conv2d_grad_input(g, w, shape, s, p)
        cost.macs_grad_input = cost.macs_forward  # the same valid taps, transposed
        return csr_conv.csr_conv2d_grad_input(g, m.data, m.indices, m.indptr, kshape,
                                              shape, s, p)

    def __repr__(self):
        extra = "" if self.alpha == 1.0 else f", alpha={self.alpha}"
        return (f"Conv2d({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}{extra})")


class Linear(WeightedLayer):
    """Fully connected layer, optionally Powerprop and sparse: y = x @ w.T + b.

    x: (N, in_features) f4 -> y: (N, out_features) f4; weight ``v``: (out, in).
    See https://pytorch.org/docs/stable/generated/torch.nn.Linear.html
    """

    _kind = "linear"

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 alpha: float = 1.0, rng: np.random.Generator | None = None):
        for name, val in (("in_features", in_features), ("out_features", out_features)):
            if int(val) != val or val < 1:
                raise ConfigError(f"Linear {name}: expected an integer >= 1, got {val!r}")
        self.in_features, self.out_features = in_features, out_features
        super().__init__((out_features, in_features), in_features, bias, alpha, rng)

    def forward(self, x, train, grad=None):
        x = as_f32(x, Where(self, "forward"))
        if x.ndim != 2 or x.shape[1] != self.in_features:
            hint = "; flatten first" if x.ndim > 2 else ""
            raise ShapeError(f"{self!r}.forward: expected x of shape "
                             f"(N, {self.in_features}), got {tuple(x.shape)}{hint}")
        w, dw_dv, m, pat = self._forward_weight(keeps_cache(train, grad))
        bias = self._forward_bias()
        if m is None:
            y = x @ w.T
            if bias is not None:
                y += bias
        elif self._frozen is not None:  # validated once, bias added as y is written
            x4 = np.require(x, requirements=["W"]).reshape(x.shape + (1, 1))
            y = self._frozen_plan(x4, m).run(x4, bias).reshape(x.shape[0], -1)
        else:
            y = csr_linear.csr_linear_forward(x, m.data, m.indices, m.indptr,
                                              self.out_features)
            if bias is not None:
                y += bias
        self._record_forward(x, y, w, dw_dv, m, self._keep_input(x, train, grad), pat)
        return y

    def backward(self, grad_out):
        act, w, m, dw_dv, pat = self._take_cache()
        g = as_f32(grad_out, Where(self, "backward"))
        if g.shape != (act.shape[0], self.out_features):
            raise ShapeError(f"{self!r}.backward: expected grad_out of shape "
                             f"{(act.shape[0], self.out_features)}, got {tuple(g.shape)}")
        cost = self.cost
        dense_macs = g.size * self.in_features
        cost.dense_macs_grad_weight = cost.dense_macs_grad_input = dense_macs
        if pat is not None:
            grad_vals, cost.macs_grad_weight = static_pattern.linear_grad(pat, act, g)
            self._accumulate_pattern_grad(grad_vals, dw_dv, pat)
        elif isinstance(act, SparseActivations):
            idx = act.indices()
            grad_w = sparse_grad.linear_grad_weight_sparse(idx, act.values, act.shape,
                                                           g)
            cost.macs_grad_weight = int(idx.size) * self.out_features
            self._accumulate_weight_grad(grad_w, dw_dv)
        else:
            grad_w = g.T @ act
            cost.macs_grad_weight = dense_macs
            self._accumulate_weight_grad(grad_w, dw_dv)
        if self.bias is not None:
            self.grad_bias += g.sum(axis=0)
        if m is None:
            cost.macs_grad_input = dense_macs
            return g @ w
        cost.macs_grad_input = g.shape[0] * m.nnz
        return csr_linear.csr_linear_grad_input(g, m.data, m.indices, m.indptr,
                                                self.in_features)

    def __repr__(self):
        extra = "" if self.alpha == 1.0 else f", alpha={self.alpha}"
        return (f"Linear({self.in_features}, {self.out_features}, "
                f"bias={self.bias is not None}{extra})")
