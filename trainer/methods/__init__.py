"""The federated methods, one module each (see base.py for what a method says).

``get(name)`` returns a method; ``METHODS`` lists their names in the order the
tools show them.
"""

from __future__ import annotations

from . import fedavg, sparsefedpp, topk, zerofl
from .base import Method, MethodConfig

_REGISTRY = {m.METHOD.name: m.METHOD for m in (sparsefedpp, zerofl, topk, fedavg)}
METHODS = tuple(_REGISTRY)


def get(name: str) -> Method:
    """The method called ``name`` (KeyError for an unknown one: validate with
    MethodConfig, which says what is accepted)."""
    return _REGISTRY[name]


def default_alpha(method: str) -> float:
    """Powerprop exponent a method trains with (SparseFedPP's reference: 1.25)."""
    return get(method).alpha


def default_sparsity(method: str) -> float:
    """The sparsity a configuration that names none gets (0.9; fedavg 0; an
    unknown name gets 0.9 and MethodConfig then says what is accepted)."""
    return _REGISTRY[method].default_sparsity if method in _REGISTRY \
        else Method.default_sparsity


def is_dense(method: str) -> bool:
    """A method that uploads every weight (fedavg): it has no sparsity to sweep."""
    return method in _REGISTRY and _REGISTRY[method].dense


__all__ = ["METHODS", "Method", "MethodConfig", "default_alpha", "default_sparsity",
           "get", "is_dense"]
