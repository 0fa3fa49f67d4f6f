"""What every rank must agree on before the first step: torch's seed, the run config and the
environment; and the length of the reports they will exchange.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator, Sequence

import torch

from trainguard.monitor._checks import Check
from trainguard.monitor._config import GuardConfig
from trainguard.monitor._distributed import Channel
from trainguard.monitor._verdict import Failure

__all__ = ["compare_identity", "digest", "hook_digest"]


def compare_identity(
    channel: Channel,
    config: GuardConfig,
    length: int,
    *,
    hooks: int = 0,
    replica_groups: Sequence[Sequence[int]] = (),
) -> tuple[int, list[Failure]]:
    """One all-gather: the longest report length (every report is padded to it, so that ranks guarding
    models of different shapes still share one gather) and the identity fields that differ. `hooks` (a
    digest of the model's and optimizer's hooks, `hook_digest`) is compared within each replica group:
    replicas run the same code, stages of a pipeline need not."""
    fields = {
        "seed": (Check.SEED, digest(torch.initial_seed())),
        "run config": (Check.IDENTITY, digest(config.run_config or {})),
        "environment": (Check.IDENTITY, _environment_digest()),
        "model's hooks": (Check.CODE, hooks),
    }
    rows = channel.gather([length, *(value for _, value in fields.values())])
    failures = []
    for position, (name, (check, _)) in enumerate(fields.items(), start=1):
        column = [row[position] for row in rows]
        if name == "model's hooks":
            failures.extend(_replicas_differ(column, replica_groups, config, check, name))
            continue
        if not config.enabled(check) or len(set(column)) == 1:
            continue
        majority = max(set(column), key=column.count)
        odd: tuple[int, ...] = ()
        if column.count(majority) * 2 > len(column):
            odd = tuple(rank for rank, value in enumerate(column) if value != majority)
        who = (
            "the ranks"
            if not odd
            else f"rank {odd[0]}"
            if len(odd) == 1
            else "ranks " + ", ".join(map(str, odd))
        )
        message = f"the {name} of {who} differs from the other ranks' at the start of the run"
        failures.append(Failure(check, odd, 0, message, config.actions[check]))
    return max(row[0] for row in rows), failures


def _replicas_differ(
    column: list[int], groups: Sequence[Sequence[int]], config: GuardConfig, check: Check, name: str
) -> list[Failure]:
    failures = []
    for group in groups if config.enabled(check) else ():
        values = [column[rank] for rank in group if rank < len(column)]
        if len(set(values)) <= 1:
            continue
        majority = max(set(values), key=values.count)
        odd = (
            tuple(rank for rank in group if column[rank] != majority)
            if values.count(majority) * 2 > len(values)
            else ()
        )
        who = f"rank {odd[0]}" if len(odd) == 1 else "ranks " + ", ".join(map(str, odd or group))
        message = (
            f"the {name} of {who} differ from those of its replicas at the start of the run: a hook "
            "registered on one replica changes what it computes"
        )
        failures.append(Failure(check, odd or tuple(group), 0, message, config.actions[check]))
    return failures


def hook_digest(modules: Iterable[torch.nn.Module], params: Iterable[torch.Tensor]) -> int:
    """A digest of every hook on `modules` (forward, pre-forward, backward) and on `params` (gradient
    and post-accumulate hooks), by where it is and the code it runs."""
    found: list[tuple[str, str, str]] = []
    for number, module in enumerate(modules):
        for registry in _MODULE_HOOKS:
            hooks = getattr(module, registry, None) or {}
            found.extend((f"module {number}", registry, _code_of(hook)) for hook in hooks.values())
    for number, param in enumerate(params):
        for registry in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            hooks = getattr(param, registry, None) or {}
            found.extend((f"param {number}", registry, _code_of(hook)) for hook in hooks.values())
    return digest(found)


_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _code_of(hook: object) -> str:
    """The hook's name, a hash of its code, and the real numbers it closes over or is given: the same
    code scaling by 1.5 on one replica and by 1.0 on the others is not the same hook. Integers and
    objects are left out on purpose: a legitimate hook may capture its rank, a counter or a module."""
    bound: list[object] = []
    function = hook
    if isinstance(function, functools.partial):
        bound.extend((*function.args, *function.keywords.values()))
        function = function.func
    function = getattr(function, "__func__", function)
    code = getattr(function, "__code__", None)
    name = getattr(function, "__qualname__", type(function).__qualname__)
    if code is None:
        return name
    for cell in getattr(function, "__closure__", None) or ():
        with contextlib.suppress(ValueError):  # an empty cell
            bound.append(cell.cell_contents)
    bound.extend(getattr(function, "__defaults__", None) or ())
    bound.extend((getattr(function, "__kwdefaults__", None) or {}).values())
    numbers = [repr(value) for value in _reals(bound)]
    code_hash = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
    return f"{name}:{code_hash}:{','.join(numbers)}"


def _reals(values: Iterable[object], depth: int = 0) -> Iterator[float | complex]:
    """The floats among `values`, and inside their tuples and lists (two levels deep)."""
    for value in values:
        if isinstance(value, float | complex):
            yield value
        elif isinstance(value, tuple | list) and depth < 2:
            yield from _reals(value, depth + 1)


def digest(value: object) -> int:
    text = json.dumps(value, sort_keys=True, default=repr).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little", signed=True)


def _environment_digest() -> int:
    """The environment digest `trainguard run` verified, else the versions this process runs."""
    given = os.environ.get("TRAINGUARD_ENV_DIGEST")
    if given:
        return digest(given)
    return digest([sys.version, torch.__version__, sorted(_loaded_versions())])


def _loaded_versions() -> Iterator[str]:
    for name in ("numpy", "transformers", "lightning", "pytorch_lightning", "accelerate", "trainguard"):
        module = sys.modules.get(name)
        if module is not None:
            yield f"{name}=={getattr(module, '__version__', '?')}"
