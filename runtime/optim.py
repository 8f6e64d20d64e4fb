"""SGD with momentum, Nesterov and weight decay (PyTorch's update rule), and LR schedules.

A parameter whose layer has a static pattern (runtime/sparsity/static_pattern.py: Powerprop
alpha > 1, the gradient zero outside the pattern) is updated at the pattern only,
O(nnz): outside it the weight, its gradient and its momentum are all zero, so the
dense update would leave them zero too. Its momentum buffer is then kept as values
at the pattern; ``momentum_buffers`` and ``state_dict`` show it dense.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import CheckpointError, ConfigError
from .sparsity import static_pattern


class Optimizer:
    """Owns the loop over parameters; a subclass writes ``_step(name, p, g)``.

    ``params`` and ``grads`` are the model's dicts of arrays (same keys); the
    optimizer updates the parameter arrays in place.
    """

    def __init__(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
                 lr: float):
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ConfigError(f"Invalid learning rate: expected a finite value >= 0, "
                              f"got {lr!r}")
        if not params:
            raise ConfigError("optimizer: expected at least one parameter, got none")
        if params.keys() != grads.keys():
            raise ConfigError("optimizer: params and grads must have the same names")
        self.params, self.grads, self.lr = params, grads, float(lr)

    def step(self) -> None:
        for name, p in self.params.items():
            self._step(name, p, self.grads[name])

    def _step(self, name, p, g):
        raise NotImplementedError


class SGD(Optimizer):
    """torch.optim.SGD: g += wd*p; buf = m*buf + (1-dampening)*g (buf = g at first);
    g = g + m*buf (Nesterov) or buf; p -= lr*g."""

    def __init__(self, params, grads, lr: float, *, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False,
                 dampening: float = 0.0):
        super().__init__(params, grads, lr)
        if momentum < 0 or weight_decay < 0:
            raise ConfigError(f"SGD: expected momentum >= 0 and weight_decay >= 0, got "
                              f"{momentum} and {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("SGD: Nesterov momentum needs momentum > 0 and dampening 0")
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.nesterov, self.dampening = bool(nesterov), float(dampening)
        self._dense_buffers: dict[str, np.ndarray] = {}
        # name -> (pattern, momentum values (nnz,) f4) of pattern-updated parameters
        self._pattern_buffers: dict[str, tuple] = {}

    @property
    def momentum_buffers(self) -> dict[str, np.ndarray]:
        """Momentum buffers by parameter name, dense (pattern ones materialised)."""
        out = dict(self._dense_buffers)
        for name, (pat, vals) in self._pattern_buffers.items():
            out[name] = self._densify(name, pat, vals)
        return out

    @momentum_buffers.setter
    def momentum_buffers(self, bufs: dict[str, np.ndarray]) -> None:
        self._dense_buffers = dict(bufs)
        self._pattern_buffers = {}

    def _densify(self, name, pat, vals) -> np.ndarray:
        buf = np.zeros(self.params[name].shape, dtype=np.float32)
        buf.reshape(-1)[pat.flat] = vals
        return buf

    def _step(self, name, p, g):
        layer = static_pattern.owner_of(p)
        if layer is not None:
            owned = layer.owns_grad(g)
            pat = layer.pattern_for_step() if owned else None
            if pat is not None and self._adopt(name, pat):
                self._step_pattern(name, p, layer.grad_values(pat), pat)
                return
            layer.invalidate_pattern()  # a dense update may regrow weights outside it
            if owned:
                g = layer.grad_weight  # the same array, pending pattern values written in
        if name in self._pattern_buffers:
            self._dense_buffers[name] = self._densify(name,
                                                      *self._pattern_buffers.pop(name))
        self._step_dense(name, p, g)

    def _adopt(self, name, pat) -> bool:
        """Put the momentum buffer of ``name`` on ``pat``; False when it is nonzero
        outside the pattern (the dense update would then move those weights)."""
        if not self.momentum:
            return True
        held = self._pattern_buffers.get(name)
        if held is not None and held[0] is pat:
            return True
        buf = self._dense_buffers.get(name)
        if held is not None:
            buf = self._densify(name, *held)
        if buf is None:  # no buffer yet: the first step sets it to g
            self._pattern_buffers.pop(name, None)
            return True
        vals = buf.reshape(-1)[pat.flat]
        if np.count_nonzero(buf) != np.count_nonzero(vals):
            if held is not None:
                self._dense_buffers[name] = buf
                del self._pattern_buffers[name]
            return False
        self._dense_buffers.pop(name, None)
        self._pattern_buffers[name] = (pat, vals)
        return True

    def _step_pattern(self, name, p, gv, pat):
        """The dense update of ``_step_dense`` at the pattern's entries only (``gv``:
        the gradient there, not modified)."""
        flat = pat.flat
        p_flat = p.reshape(-1)
        pv = p_flat[flat]
        if self.weight_decay:
            gv = gv + np.float32(self.weight_decay) * pv
        if self.momentum:
            held = self._pattern_buffers.get(name)
            if held is None:
                buf = np.array(gv, dtype=np.float32)
                self._pattern_buffers[name] = (pat, buf)
            else:
                buf = held[1]
                buf *= np.float32(self.momentum)
                buf += np.float32(1.0 - self.dampening) * gv
            gv = gv + np.float32(self.momentum) * buf if self.nesterov else buf
        pv -= np.float32(self.lr) * gv
        p_flat[flat] = pv

    def _step_dense(self, name, p, g):
        if self.weight_decay:
            g = g + np.float32(self.weight_decay) * p
        if self.momentum:
            buf = self._dense_buffers.get(name)
            if buf is None:
                buf = self._dense_buffers[name] = np.array(g, dtype=np.float32)
            else:
                buf *= np.float32(self.momentum)
                buf += np.float32(1.0 - self.dampening) * g
            g = g + np.float32(self.momentum) * buf if self.nesterov else buf
        p -= np.float32(self.lr) * g

    def state_dict(self) -> dict[str, np.ndarray]:
        """Momentum buffers by parameter name (copies) plus the hyper-parameters."""
        state = {f"momentum_buffer.{k}": v.copy() for k, v in self.momentum_buffers.items()}
        state["hparams"] = np.array([self.lr, self.momentum, self.weight_decay,
                                     float(self.nesterov), self.dampening])
        return state

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        """Restore momentum buffers saved by state_dict(); checks names and shapes."""
        bufs = {}
        for key, arr in state.items():
            if key == "hparams":
                continue
            name = key.removeprefix("momentum_buffer.")
            if name not in self.params or arr.shape != self.params[name].shape:
                raise CheckpointError(f"optimizer state '{key}': expected a buffer for a "
                                      "model parameter of the same shape, got shape "
                                      f"{arr.shape}")
            bufs[name] = np.array(arr, dtype=np.float32)
        self.momentum_buffers = bufs


def lr_schedule(kind: str, lr0: float, total_steps: int, *, lr_end: float = 0.0,
                step_size: int = 1, gamma: float = 0.1):
    """Return t -> learning rate for step (or round) t in [0, total_steps].

    - "constant": lr0
    - "step": lr0 * gamma^floor(t / step_size)
    - "cosine": lr_end + (lr0 - lr_end) * (1 + cos(pi t / T)) / 2
    - "exponential": lr0 * (lr_end / lr0)^(t / T), from lr0 down to lr_end
    """
    if total_steps < 1:
        raise ConfigError(f"lr_schedule total_steps: expected >= 1, got {total_steps}")
    T = float(total_steps)
    if kind == "constant":
        return lambda t: lr0
    if kind == "step":
        if step_size < 1:
            raise ConfigError(f"lr_schedule step_size: expected >= 1, got {step_size}")
        return lambda t: lr0 * gamma ** (t // step_size)
    if kind == "cosine":
        return lambda t: lr_end + (lr0 - lr_end) * (1 + math.cos(math.pi * min(t, T) / T)) / 2
    if kind == "exponential":
        if lr0 <= 0 or lr_end <= 0:
            raise ConfigError(f"exponential schedule: expected lr0 > 0 and lr_end > 0, "
                              f"got {lr0} and {lr_end}")
        return lambda t: lr0 * (lr_end / lr0) ** (min(t, T) / T)
    raise ConfigError(f"lr schedule: expected constant, step, cosine or exponential, "
                      f"got {kind!r}")
