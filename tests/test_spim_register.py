"""One rule per op: ``register`` refuses a second handler for a torch callable
at import time instead of letting the later module silently win; so does
``rng.register_plain_route`` for the plain-tensor routes of the grid-invariant mode."""
from __future__ import annotations

import pytest
import torch

import rest_ds.spim  # noqa: F401  (registers every rule)
from rest_ds.spim.errors import SPIMError
from rest_ds.spim.tensor import _HANDLERS, register


def test_second_rule_for_an_op_raises_naming_both():
    before = _HANDLERS[torch.einsum]

    def other(func, args, kwargs):  # pragma: no cover - never called
        raise AssertionError

    with pytest.raises(SPIMError, match=r"einsum has two SPIM rules: .*_einsum and .*other"):
        register(torch.einsum)(other)
    assert _HANDLERS[torch.einsum] is before  # the first rule stays


def test_new_op_registers_once_and_aliases_count_once():
    def fake_op(x):  # a callable nobody registered
        return x

    def rule(func, args, kwargs):
        return "rule"

    try:
        register(fake_op, fake_op, None)(rule)  # an alias listed twice in one call, a missing op skipped
        assert _HANDLERS[fake_op] is rule
        with pytest.raises(SPIMError, match="two SPIM rules"):
            register(fake_op)(rule)  # the same rule from a second register() is a duplicate too
    finally:
        _HANDLERS.pop(fake_op, None)


def test_plain_route_is_one_per_op_and_never_a_random_op():
    import torch.nn.functional as F

    from rest_ds.spim import rng
    from rest_ds.spim.ops.resample import route_replicated

    def other(func, types, args, kwargs):  # pragma: no cover - never called
        raise AssertionError

    rng.register_plain_route(F.interpolate, route_replicated)  # the same route again: no change
    with pytest.raises(SPIMError, match="two plain-tensor rules for interpolate"):
        rng.register_plain_route(F.interpolate, other)
    with pytest.raises(SPIMError, match="two plain-tensor rules for dropout"):
        rng.register_plain_route(F.dropout, other)  # random ops have their grid-invariant rule
    assert rng._ROUTES[F.interpolate] is route_replicated and F.dropout not in rng._ROUTES
