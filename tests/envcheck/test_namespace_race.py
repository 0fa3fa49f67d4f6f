"""A namespace snapshot survives another thread binding names while it is taken.

In a job, a lazy import or a backend's own thread can bind module attributes at any moment; the
snapshot once iterated a live module dict and stopped with "dictionary changed size during
iteration" (seen as a two-rank job failing to start under CI load). Here the binding happens
deterministically, from inside the iteration: `isinstance` reads `__class__`, which this object
turns into a side effect."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import pytest

from trainguard.envcheck._namespaces import NamespaceSnapshot


@pytest.fixture
def module() -> Iterator[types.ModuleType]:
    name = "trainguard_test_race_module"
    mod = types.ModuleType(name)
    sys.modules[name] = mod
    yield mod
    del sys.modules[name]


def test_a_name_bound_while_the_snapshot_is_taken(module: types.ModuleType) -> None:
    class BindsOnLook:
        @property  # type: ignore[misc]
        def __class__(self) -> type:
            module.__dict__[f"bound_{len(module.__dict__)}"] = len
            return BindsOnLook

    def genuine() -> None:
        return None

    module.looker = BindsOnLook()
    module.genuine = genuine
    snapshot = NamespaceSnapshot.take(turns=1, modules=[module.__name__])
    assert snapshot.size > 0
    # The snapshot is usable: a later swap of the genuine function is found.
    module.genuine = print
    assert any("genuine" in finding.message for finding in snapshot.check())
