"""PLACEHOLDER: torch custom ops go here (issue 5). For now a pass-through to the impls."""

from . import api


def softmax(x, axis, *, scale, where, backend):
    return api._softmax_impl(x, axis, scale, where, None, backend, is_log=False)


def log_softmax(x, axis, *, scale, where, backend):
    return api._softmax_impl(x, axis, scale, where, None, backend, is_log=True)


def cross_entropy(logits, target, **kw):
    return api._cross_entropy_impl(logits, target, want_grad=False, **kw)[0]


def cross_entropy_with_grad(logits, target, **kw):
    return api._cross_entropy_impl(logits, target, want_grad=True, **kw)
