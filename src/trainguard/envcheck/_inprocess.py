"""Checks that run inside the training process: is the code it runs the code that was installed?

A saboteur who can run code in the process does not need to touch a file: one assignment replaces
`SGD.step`, one `__code__` swap changes `torch.manual_seed`, one global hook sees every forward pass.
So the monitor checks two things. `verify_loaded` hashes the files every loaded module came from and
compares them with RECORD or a baseline. `CodeSnapshot` remembers, by identity, every critical
callable, each layer of its `__wrapped__` chain (code, defaults, closure cells) and the hook
registries, and `changes()` says what differs later; `foreign_code` says which of those callables run
code from a file outside the environment (a patch made before the snapshot).

torch rewrites some of these itself. The first instance of an optimizer class wraps the class's `step`
in `Optimizer.profile_hook_step` (`_patch_step_function`), so a snapshot taken before the optimizer is
built sees `SGD.step` change. That one rewrite is accepted only when it is exactly torch's: the new
function's code object is the `wrapper` nested in the snapshot's `profile_hook_step`, its globals are
`torch.optim.optimizer`'s, and its one closure cell holds the very function the snapshot recorded. A
patch made with `functools.wraps`, or `profile_hook_step` around anything else, fails that test.
DistributedDataParallel registers hooks of its own on the model in some modes; a hook whose code lives
in DDP's own file is accepted. Nothing here imports torch: it is looked up in `sys.modules`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._hashing import sha256_files
from trainguard.envcheck._quickcheck import QuickCheck
from trainguard.errors import TrainguardError
from trainguard.findings import Severity

__all__ = ["CodeSnapshot", "foreign_code", "verify_loaded"]

# Critical callables as (module, dotted attribute path); each is looked up only when its module is loaded.
_CRITICAL: tuple[tuple[str, str], ...] = (
    ("torch", "manual_seed"),
    ("torch", "seed"),
    ("torch", "Tensor"),
    ("torch.random", "manual_seed"),
    ("torch.random", "seed"),
    ("torch.cuda", "manual_seed"),
    ("torch.cuda", "manual_seed_all"),
    ("torch.cuda.random", "manual_seed"),
    ("torch.cuda.random", "manual_seed_all"),
    ("random", "seed"),
    ("random", "Random.seed"),
    ("numpy.random", "seed"),
    ("torch.optim.optimizer", "Optimizer.__init__"),
    ("torch.optim.optimizer", "Optimizer.step"),
    ("torch.optim.optimizer", "Optimizer.zero_grad"),
    ("torch.optim.optimizer", "Optimizer.profile_hook_step"),
    ("torch.optim.optimizer", "Optimizer._patch_step_function"),
    ("torch._compile", "_disable_dynamo"),
    ("torch.optim.sgd", "sgd"),
    ("torch.optim.sgd", "_single_tensor_sgd"),
    ("torch.optim.sgd", "_multi_tensor_sgd"),
    ("torch.optim.sgd", "_fused_sgd"),
    ("torch.optim.adam", "adam"),
    ("torch.optim.adam", "_single_tensor_adam"),
    ("torch.optim.adam", "_multi_tensor_adam"),
    ("torch.optim.adam", "_fused_adam"),
    ("torch.optim.adamw", "adamw"),
    ("torch.optim.adamw", "adam"),
    ("torch.optim.adamw", "_single_tensor_adamw"),
    ("torch.optim.adamw", "_multi_tensor_adamw"),
    ("torch.optim.adamw", "_fused_adamw"),
    ("torch.utils.data", "DataLoader"),
    ("torch.utils.data", "default_collate"),
    ("torch.utils.data.dataloader", "DataLoader.__iter__"),
    ("torch.utils.data.dataloader", "DataLoader._get_iterator"),
    ("torch.utils.data.dataloader", "_BaseDataLoaderIter.__next__"),
    ("torch.utils.data.dataloader", "_SingleProcessDataLoaderIter._next_data"),
    ("torch.utils.data.dataloader", "_MultiProcessingDataLoaderIter._next_data"),
    ("torch.utils.data._utils.collate", "default_collate"),
    ("torch.utils.data._utils.fetch", "_MapDatasetFetcher.fetch"),
    ("torch.utils.data._utils.fetch", "_IterableDatasetFetcher.fetch"),
    ("torch.utils.data._utils.worker", "_worker_loop"),
    ("torch._tensor", "Tensor.backward"),
    ("torch.autograd", "backward"),
    ("torch.autograd", "grad"),
    ("torch.autograd.graph", "_engine_run_backward"),
    ("torch.autograd.variable", "Variable._execution_engine"),
    ("torch.nn", "Module"),
    ("torch.nn.modules.module", "Module.__call__"),
    ("torch.nn.modules.module", "Module._call_impl"),
    ("torch.nn.modules.module", "Module._wrapped_call_impl"),
    ("torch.nn.utils", "clip_grad_norm_"),
    ("torch.nn.utils.clip_grad", "clip_grad_norm_"),
    ("torch.nn.utils.clip_grad", "_clip_grads_with_norm_"),
    ("torch.nn.utils.clip_grad", "_get_total_norm"),
    *(
        (module, name)
        for module in ("torch.distributed", "torch.distributed.distributed_c10d")
        for name in ("all_reduce", "broadcast", "all_gather", "reduce_scatter")
    ),
)
_OPTIMIZER_METHODS = ("step", "zero_grad")
# Wrappers torch applies to its own functions after the snapshot may have been taken, as (module of the
# function that makes the wrapper, its path, the nested function's name, the closure variable holding the
# wrapped function, the values the other closure variables hold).
_TORCH_WRAPPERS: tuple[tuple[str, str, str, str, Mapping[str, object]], ...] = (
    # Optimizer._patch_step_function: the first instance of each class wraps the class's `step`.
    ("torch.optim.optimizer", "Optimizer.profile_hook_step", "wrapper", "func", {}),
    # torch/_dynamo/__init__.py: `torch.manual_seed = torch._disable_dynamo(torch.manual_seed)`; torch._dynamo
    # is imported lazily by the first optimizer step or zero_grad.
    ("torch._compile", "_disable_dynamo", "inner", "fn", {"recursive": True}),
)
_MODULE_HOOKS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_OPTIMIZER_HOOKS = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)
_PARAMETER_HOOKS = ("_backward_hooks", "_post_accumulate_grad_hooks")
_GLOBAL_REGISTRY_MODULES = ("torch.nn.modules.module", "torch.optim.optimizer")
_MAX_LAYERS = 32  # a __wrapped__ chain longer than this is reported as it stands
_MISSING: Any = object()  # an attribute that is not there
_EMPTY_CELL: Any = object()

_PATCH_ADVICE = (
    "Stop the run: code in this process replaced a library function; find what imported the file named "
    "and restart from an environment that `trainguard env verify` passes."
)
_HOOK_ADVICE = "Stop the run unless your own code registered this hook; find what registered it."


# ---------------------------------------------------------------------------------------------------
# verify_loaded


def verify_loaded(
    expected: Mapping[str, bytes] | None = None,
    *,
    modules: Mapping[str, object] | None = None,
    roots: Sequence[str] | None = None,
) -> list[EnvFinding]:
    """Check that every loaded module comes from a file whose digest `expected` (absolute real path ->
    raw SHA-256; default: the RECORD rows of this environment's distributions) knows."""
    from trainguard.envcheck._layout import resolve_layout

    layout = resolve_layout()
    site_dirs = [os.path.realpath(d) for d in layout.site_dirs]
    stdlib = os.path.realpath(layout.stdlib)
    root_dirs = _real_roots(roots) if roots is not None else _default_roots()
    owners: dict[str, str] = {}
    editables: dict[str, str] = {}
    if expected is None:
        expected, owners, editables = _recorded_digests(site_dirs)
    from_editable: dict[str, list[tuple[str, list[str]]]] = {}
    loaded: dict[str, list[str]] = {}
    items = list((sys.modules if modules is None else modules).items())
    for name, module in items:
        for path in _module_files(module):
            loaded.setdefault(os.path.realpath(path), []).append(name)

    findings: list[EnvFinding] = []
    unverifiable = 0
    to_hash: list[str] = []
    for path, names in sorted(loaded.items()):
        what = _modules_phrase(names)
        editable = next((loc for loc in editables if _under(path, [loc])), None)
        if editable is not None and not _under(path, root_dirs):
            from_editable.setdefault(editable, []).append((path, names))
        elif not _under(path, root_dirs):
            findings.append(
                EnvFinding(
                    "loaded-outside",
                    Severity.HIGH,
                    path,
                    f"{what} was loaded from outside the environment, so no install record vouches for it.",
                    "Make sure the file is yours; if not, stop the run and find how it got on the path.",
                )
            )
        elif path in expected:
            to_hash.append(path)
        elif path.endswith(".pyc") or (_under(path, [stdlib]) and not _under(path, site_dirs)):
            unverifiable += 1  # stdlib sources and cached bytecode: no RECORD row carries their digest
        else:
            findings.append(
                EnvFinding(
                    "loaded-unrecorded",
                    Severity.HIGH,
                    path,
                    f"{what} was loaded from a file that no install record or baseline knows.",
                    "Run `trainguard env verify` and remove the file unless you put it there.",
                )
            )
    digests = sha256_files(to_hash)
    for path in to_hash:
        got = digests[path]
        what = _modules_phrase(loaded[path])
        if isinstance(got, OSError):
            findings.append(
                EnvFinding(
                    "loaded-unreadable",
                    Severity.MEDIUM,
                    path,
                    f"{what} was loaded from this file, which cannot be read now ({got.strerror or got}).",
                    "Find out why the file changed or vanished after it was loaded, then check again.",
                    owners.get(path),
                )
            )
        elif got != expected[path]:
            findings.append(
                EnvFinding(
                    "loaded-modified",
                    Severity.CRITICAL,
                    path,
                    f"{what} was loaded from a file whose content differs from the installed one.",
                    "Stop the run and reinstall the distribution; find who edited the file.",
                    owners.get(path),
                )
            )
    findings.extend(_editable_findings(from_editable, editables))
    if unverifiable:
        findings.append(
            EnvFinding(
                "loaded-unverifiable",
                Severity.LOW,
                "sys.modules",
                f"{unverifiable} loaded files (standard library sources, cached bytecode) have no recorded "
                "digest, so this check cannot tell whether they were changed.",
                "Run `trainguard env verify --baseline` to check them against a signed baseline.",
            )
        )
    return sorted(findings, key=EnvFinding.sort_key)


def _module_files(module: object) -> list[str]:
    """The source (or extension) file a module was loaded from, and its cached bytecode when present.
    Reads the module's __dict__ only: a module-level __getattr__ is never run."""
    namespace = getattr(module, "__dict__", None)
    if not isinstance(namespace, dict):
        return []
    spec = namespace.get("__spec__")
    origin: object = None
    cached: object = None
    if spec is not None and getattr(spec, "has_location", False):
        origin = getattr(spec, "origin", None)
        cached = getattr(spec, "cached", None)
        archive = getattr(getattr(spec, "loader", None), "archive", None)
        if isinstance(archive, str):  # zipimport: the archive is the file on disk
            return [archive]
    elif spec is None:
        origin = namespace.get("__file__")
    files = [origin] if isinstance(origin, str) and os.path.isabs(origin) else []
    if files and isinstance(cached, str) and os.path.isfile(cached):
        files.append(cached)
    return files


def _editable_findings(
    from_editable: Mapping[str, list[tuple[str, list[str]]]], editables: Mapping[str, str]
) -> list[EnvFinding]:
    """One finding per editable install that code was loaded from: its files are many, the fact one."""
    findings = []
    for location, loaded in sorted(from_editable.items()):
        names = sorted({name for _, module_names in loaded for name in module_names})
        findings.append(
            EnvFinding(
                "loaded-editable",
                Severity.MEDIUM,
                location,
                f"{_modules_phrase(names)} ({len(loaded)} files) were loaded from the editable install of "
                f"{editables[location]} in {location}: no install record hashes that code, and anyone who "
                "can write there can change it.",
                "Install a built wheel where the run must be verifiable (shared training nodes); an "
                "editable install is for development.",
                editables[location],
            )
        )
    return findings


def _recorded_digests(
    site_dirs: Sequence[str],
) -> tuple[dict[str, bytes], dict[str, str], dict[str, str]]:
    """Recorded digests by real path, the distribution of each, and the source tree of each editable
    install (real path -> distribution)."""
    from trainguard.envcheck._dists import read_distributions

    digests: dict[str, bytes] = {}
    owners: dict[str, str] = {}
    editables: dict[str, str] = {}
    for site in site_dirs:
        for dist in read_distributions(site):
            if dist.editable and dist.editable_location:
                editables[os.path.realpath(dist.editable_location)] = dist.name
            for row in dist.records:
                if row.algorithm == "sha256" and row.digest is not None:
                    # Real path of the site dir joined with the row: one realpath per dir, not per row.
                    path = os.path.normpath(os.path.join(site, row.path))
                    digests[path] = row.digest
                    owners[path] = dist.name
    return digests, owners, editables


def _modules_phrase(names: Sequence[str]) -> str:
    shown = ", ".join(sorted(names)[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"Module {shown}{more}"


# ---------------------------------------------------------------------------------------------------
# roots


@functools.cache
def _default_roots() -> tuple[str, ...]:
    from trainguard.envcheck._layout import resolve_layout

    layout = resolve_layout()
    dirs = [layout.prefix, layout.stdlib, *layout.site_dirs]
    if layout.dynload:
        dirs.append(layout.dynload)
    return _real_roots(dirs)


def _real_roots(roots: Sequence[str]) -> tuple[str, ...]:
    return tuple(sorted({os.path.realpath(r) for r in roots}))


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


@functools.lru_cache(maxsize=4096)
def _real_file(filename: str) -> str:
    return os.path.realpath(filename)


def _code_inside(code: types.CodeType, roots: Sequence[str]) -> bool:
    filename = code.co_filename
    if filename.startswith("<frozen "):
        return True  # part of the interpreter binary
    return os.path.isabs(filename) and _under(_real_file(filename), roots)


# ---------------------------------------------------------------------------------------------------
# layers: what a callable runs


# One object of a `__wrapped__` chain and, for a function, what decides what it runs: (object, code,
# defaults, kwdefaults, kwdefaults' items (a dict can change in place), closure cell contents, partial
# args). The snapshot keeps these tuples, so every object whose id it compares stays alive.
_Layer = tuple[object, ...]


def _layers(obj: object) -> tuple[_Layer, ...]:
    """Follow descriptors, bound methods, partials and `__wrapped__` down to the innermost object."""
    out: list[_Layer] = []
    seen: set[int] = set()
    current: object = obj
    while current is not _MISSING and id(current) not in seen and len(out) < _MAX_LAYERS:
        seen.add(id(current))
        after: object = _MISSING
        if isinstance(current, types.FunctionType):
            closure = current.__closure__
            kw = current.__kwdefaults__
            out.append(
                (
                    current,
                    current.__code__,
                    current.__defaults__,
                    kw,
                    *(dict.items(kw) if kw else ()),
                    *((_cell_value(c) for c in closure) if closure else ()),
                )
            )
            after = current.__dict__.get("__wrapped__", _MISSING)
        elif isinstance(current, (staticmethod, classmethod, types.MethodType)):
            out.append((current,))
            after = current.__func__
        elif isinstance(current, functools.partial):
            out.append((current, current.args, current.keywords, *dict.items(current.keywords)))
            after = current.func
        elif _is_wrapped_hook(current):
            # torch wraps module hooks registered with a module reference; what runs is `.hook`.
            out.append((current,))
            after = vars(current).get("hook", _MISSING)
        else:
            out.append((current,))
        current = after
    return tuple(out)


def _is_wrapped_hook(obj: object) -> bool:
    kind = type(obj)
    return kind.__name__ == "_WrappedHook" and kind.__module__ == "torch.nn.modules.module"


def _fingerprint(layers: tuple[_Layer, ...]) -> tuple[int, ...]:
    """The ids of everything in the layers, flat: comparing two of these is one C-level tuple compare.
    Sound only while the recorded objects are alive (no new object can take a live object's id)."""
    return tuple(id(x) for layer in layers for x in (len(layer), *layer))


def _layer_of(layers: tuple[_Layer, ...], index: int) -> _Layer:
    return layers[index] if index < len(layers) else ()


def _cell_value(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return _EMPTY_CELL


def _codes(obj: object) -> list[types.CodeType]:
    return [layer[1] for layer in _layers(obj) if isinstance(layer[0], types.FunctionType)]  # type: ignore[misc]


def _describe(obj: object) -> str:
    for code in _codes(obj):
        return _code_where(code)
    return f"a {type(obj).__name__} object"


# ---------------------------------------------------------------------------------------------------
# which callables are critical


def _static_get(holder: object, name: str) -> object:
    """The attribute as stored: a class's own or inherited __dict__ entry, never a descriptor's result."""
    if isinstance(holder, type):
        for klass in holder.__mro__:
            if name in klass.__dict__:
                return klass.__dict__[name]
        return _MISSING
    namespace = getattr(holder, "__dict__", None)
    return namespace.get(name, _MISSING) if isinstance(namespace, dict) else _MISSING


def _resolve(module: types.ModuleType, path: str) -> object:
    current: object = module
    for part in path.split("."):
        current = _static_get(current, part)
        if current is _MISSING:
            break
    return current


def _optimizer_classes() -> Iterator[type]:
    """torch's optimizer classes: every subclass of Optimizer defined in a torch module."""
    module = sys.modules.get("torch.optim.optimizer")
    base = _static_get(module, "Optimizer") if module is not None else _MISSING
    if not isinstance(base, type):
        return
    todo, seen = [base], {base}
    while todo:
        klass = todo.pop()
        yield klass
        subclasses: list[type] = type.__subclasses__(klass)
        for sub in subclasses:
            if sub not in seen and sub.__module__.partition(".")[0] == "torch":
                seen.add(sub)
                todo.append(sub)


def _targets() -> list[tuple[str, types.ModuleType, str]]:
    """(name, module, attribute path) of every critical callable whose module is loaded now."""
    out: list[tuple[str, types.ModuleType, str]] = []
    for module_name, path in _CRITICAL:
        module = sys.modules.get(module_name)
        if isinstance(module, types.ModuleType):
            out.append((f"{module_name}.{path}", module, path))
    for klass in _optimizer_classes():
        module = sys.modules.get(klass.__module__)
        if isinstance(module, types.ModuleType) and module.__dict__.get(klass.__name__) is klass:
            out.extend(
                (f"{klass.__module__}.{klass.__name__}.{method}", module, f"{klass.__name__}.{method}")
                for method in _OPTIMIZER_METHODS
            )
    optim = sys.modules.get("torch.optim")
    if isinstance(optim, types.ModuleType):
        names = optim.__dict__.get("__all__", ())
        out.extend((f"torch.optim.{n}", optim, n) for n in names if isinstance(optim.__dict__.get(n), type))
    return out


# ---------------------------------------------------------------------------------------------------
# the snapshot


@dataclasses.dataclass(frozen=True, eq=False)
class _Callable:
    name: str
    resolve: Callable[[], object]
    value: object
    layers: tuple[_Layer, ...]  # () for what is watched by identity only (modules, classes)
    prints: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True, eq=False)
class _Registry:
    name: str
    resolve: Callable[[], object]
    value: object
    items: tuple[tuple[object, object], ...]


@dataclasses.dataclass(frozen=True, eq=False)
class _Wrapper:
    """A wrapper torch puts around one of its own functions after import: the wrapper's code object
    (taken from the snapshot's copy of the function that makes it), the globals it must run with, the
    closure variable that holds the wrapped function, and the values the other closure variables must
    hold."""

    code: types.CodeType
    globals: dict[str, Any]
    wrapped: str
    fixed: Mapping[str, object]


@dataclasses.dataclass(frozen=True, eq=False)
class _Context:
    """What decides whether a change is torch's own, fixed when the snapshot is taken."""

    wrappers: tuple[_Wrapper, ...]
    ddp_file: str | None
    fsdp_dir: str | None
    roots: tuple[str, ...] | None


class CodeSnapshot:
    """Critical callables and hook registries as they are now; `changes()` says what differs later.

    Holds strong references to what it recorded, so an identity compare cannot be fooled by a recycled
    id. Cheap to take and to compare (no file access, no imports): meant to run every few steps.
    """

    def __init__(
        self,
        callables: Sequence[_Callable],
        registries: Sequence[_Registry],
        context: _Context,
    ) -> None:
        self._callables = list(callables)
        self._registries = tuple(registries)
        self._context = context
        self._names = frozenset(c.name for c in callables)
        self._modules_seen = -1  # len(sys.modules) when late-loaded callables were last checked
        self._late: list[EnvFinding] = []
        self._quick: QuickCheck | None = None

    @classmethod
    def take(cls, *objects: object) -> CodeSnapshot:
        """Record the critical callables of loaded frameworks, the global hook registries, and the hooks
        of each given model (with its submodules and parameters) and optimizer."""
        callables = [_record(name, _module_getter(module, path)) for name, module, path in _targets()]
        for module_name in _linked_modules():
            callables.extend(_module_links(module_name))
        registries = list(_global_registries())
        for obj in objects:
            found_c, found_r = _object_parts(obj)
            callables.extend(found_c)
            registries.extend(found_r)
        return cls(callables, registries, _context())

    def changes(self) -> list[EnvFinding]:
        """What differs from the snapshot now; [] when nothing did."""
        findings = list(self._check_new_callables())
        quick = self._quick
        if quick is None or quick.size != len(self._callables):
            quick = self._quick = QuickCheck(
                self._callables,
                self._registries,
                missing=_MISSING,
                empty_cell=_EMPTY_CELL,
                is_wrapped_hook=_is_wrapped_hook,
            )
        if not findings and quick.unchanged():
            return []
        # Something differs from the record: compared in full, which decides (torch's own wrappers and
        # hooks are accepted there, and the quick check is laid out anew from the record).
        self._quick = None
        for index, entry in enumerate(self._callables):
            now = entry.resolve()
            if now is entry.value and (not entry.layers or _fingerprint(_layers(now)) == entry.prints):
                continue
            finding = self._check_callable(entry, now)
            if finding is None:  # torch's own wrapper: watch the wrapper from now on
                self._callables[index] = _record(entry.name, entry.resolve)
            else:
                findings.append(finding)
        for registry in self._registries:
            if registry.items or _registry_items(registry.resolve()):
                findings.extend(self._check_registry(registry))
        return sorted(findings, key=EnvFinding.sort_key)

    def _check_callable(self, entry: _Callable, now: object) -> EnvFinding | None:
        if now is entry.value:
            layers = _layers(now)
        elif self._is_torch_wrapper(now, entry.value):
            layers = _layers(entry.value)  # torch's wrapper around the recorded function: check that
            if _fingerprint(layers) == entry.prints:
                return None
        elif now is _MISSING:
            return _patched(entry.name, f"{entry.name} was removed after the snapshot.")
        else:
            return _patched(entry.name, f"{entry.name} was replaced by {_describe(now)}.")
        for index in range(max(len(layers), len(entry.layers))):
            old, new = _layer_of(entry.layers, index), _layer_of(layers, index)
            if _fingerprint((old,)) != _fingerprint((new,)):
                return _patched(entry.name, f"{entry.name} was changed in place ({_layer_change(old, new)}).")
        return _patched(entry.name, f"{entry.name} was changed in place.")

    def _is_torch_wrapper(self, now: object, was: object) -> bool:
        """True when `now` is exactly what torch itself makes of `was`: `Optimizer._patch_step_function`
        wrapping a class's `step` on its first instance, or `import torch._dynamo` wrapping
        `torch.manual_seed` in `_disable_dynamo`."""
        if not isinstance(now, types.FunctionType) or not now.__closure__:
            return False
        for wrapper in self._context.wrappers:
            if now.__code__ is wrapper.code and now.__globals__ is wrapper.globals:
                cells = dict(zip(now.__code__.co_freevars, now.__closure__, strict=True))
                return _cell_value(cells[wrapper.wrapped]) is was and all(
                    _cell_value(cells[name]) is value for name, value in wrapper.fixed.items()
                )
        return False

    def _check_registry(self, registry: _Registry) -> list[EnvFinding]:
        now = registry.resolve()
        if now is not registry.value and now is not None and registry.value is not None:
            return [
                EnvFinding(
                    "hook-added",
                    Severity.HIGH,
                    registry.name,
                    f"The hook registry {registry.name} was replaced by another object.",
                    _HOOK_ADVICE,
                )
            ]
        items = _registry_items(now)
        if _same_pairs(items, registry.items):
            return []
        before = {id(key): value for key, value in registry.items}
        after = {id(key): value for key, value in items}
        findings: list[EnvFinding] = []
        for key, hook in after.items():
            if (key not in before or before[key] is not hook) and not self._is_torch_hook(hook):
                findings.append(
                    EnvFinding(
                        "hook-added",
                        Severity.HIGH,
                        registry.name,
                        f"A hook was added to {registry.name}: {_describe(hook)}; it sees or changes every "
                        "call it is attached to.",
                        _HOOK_ADVICE,
                    )
                )
        for key, hook in before.items():
            if key not in after and not self._is_torch_hook(hook):
                findings.append(
                    EnvFinding(
                        "hook-removed",
                        Severity.MEDIUM,
                        registry.name,
                        f"A hook was removed from {registry.name}: {_describe(hook)}.",
                        "Make sure your own code removed it: a removed check hides what it watched.",
                    )
                )
        return findings

    def _is_torch_hook(self, hook: object) -> bool:
        # DDP and FSDP register hooks of their own, some lazily at the first forward pass.
        codes = _codes(hook)
        ddp_file, fsdp_dir = self._context.ddp_file, self._context.fsdp_dir
        return bool(codes) and all(
            code.co_filename == ddp_file or (fsdp_dir is not None and code.co_filename.startswith(fsdp_dir))
            for code in codes
        )

    def _check_new_callables(self) -> list[EnvFinding]:
        """A critical callable whose module was loaded after the snapshot: it has no earlier state, so
        it is checked for code from outside the environment."""
        roots = self._context.roots
        if roots is None:
            return []
        if len(sys.modules) == self._modules_seen:
            return self._late  # nothing was imported since: no new callables
        self._modules_seen = len(sys.modules)
        for name, module, path in _targets():
            if name not in self._names:
                # From now on it is watched like the rest; code from outside is reported every time.
                entry = _record(name, _module_getter(module, path))
                self._callables.append(entry)
                self._names |= {name}
                self._late.extend(_foreign_layers(name, entry.value, roots))
        return self._late


def _record(name: str, resolve: Callable[[], object]) -> _Callable:
    value = resolve()
    layers = _layers(value) if value is not _MISSING else ()
    return _Callable(name, resolve, value, layers, _fingerprint(layers))


def _module_getter(module: types.ModuleType, path: str) -> Callable[[], object]:
    return lambda: _resolve(module, path)


def _linked_modules() -> list[str]:
    """The modules holding critical callables, and every package above them."""
    names = {m for m, _ in _CRITICAL} | {k.__module__ for k in _optimizer_classes()} | {"torch.optim"}
    for name in list(names):
        while "." in name:
            name = name.rpartition(".")[0]
            names.add(name)
    return sorted(n for n in names if n in sys.modules)


def _module_links(module_name: str) -> Iterator[_Callable]:
    """`sys.modules[name]` and the parent package's attribute must stay the loaded module object: a
    saboteur could otherwise swap `torch.optim` for a look-alike without touching a function."""
    module = sys.modules.get(module_name)
    if not isinstance(module, types.ModuleType):
        return
    yield _Callable(
        f"sys.modules[{module_name!r}]", lambda: sys.modules.get(module_name, _MISSING), module, ()
    )
    parent_name, _, child = module_name.rpartition(".")
    parent = sys.modules.get(parent_name) if parent_name else None
    if isinstance(parent, types.ModuleType) and parent.__dict__.get(child) is module:
        yield _Callable(module_name, lambda: parent.__dict__.get(child, _MISSING), module, ())


def _global_registries() -> Iterator[_Registry]:
    for module_name in _GLOBAL_REGISTRY_MODULES:
        module = sys.modules.get(module_name)
        if not isinstance(module, types.ModuleType):
            continue
        for name, value in sorted(module.__dict__.items()):
            if name.startswith("_global_") and name.endswith("_hooks") and isinstance(value, dict):
                yield _registry(f"{module_name}.{name}", _module_getter(module, name))


def _registry(name: str, resolve: Callable[[], object]) -> _Registry:
    value = resolve()
    return _Registry(name, resolve, value, _registry_items(value))


def _registry_items(value: object) -> tuple[tuple[object, object], ...]:
    if isinstance(value, dict):
        return tuple(dict.items(value))
    return ()


def _same_pairs(a: tuple[tuple[object, object], ...], b: tuple[tuple[object, object], ...]) -> bool:
    return len(a) == len(b) and all(x[0] is y[0] and x[1] is y[1] for x, y in zip(a, b, strict=True))


def _object_parts(obj: object) -> tuple[list[_Callable], list[_Registry]]:
    """The class, instance-level overrides and hook dicts of one model or optimizer."""
    torch = sys.modules.get("torch")
    nn_module = _resolve(torch, "nn.Module") if torch is not None else _MISSING
    optimizer = _resolve(torch, "optim.Optimizer") if torch is not None else _MISSING
    callables: list[_Callable] = []
    registries: list[_Registry] = []
    if isinstance(nn_module, type) and isinstance(obj, nn_module):
        label = type(obj).__name__
        seen: set[int] = set()
        params: list[tuple[str, object]] = []
        for path, module in _submodules(obj, label, seen):
            callables.append(_Callable(f"type({path})", _type_getter(module), type(module), ()))
            callables.append(_record(f"{path}.forward", _override_getter(module, "forward")))
            registries.extend(
                _registry(f"{path}.{attr}", _dict_getter(module, attr)) for attr in _MODULE_HOOKS
            )
            parameters = _dict_getter(module, "_parameters")()
            if isinstance(parameters, dict):
                params.extend((f"{path}.{n}", p) for n, p in parameters.items() if p is not None)
        registries.extend(_parameter_registries(params))
    elif isinstance(optimizer, type) and isinstance(obj, optimizer):
        label = type(obj).__name__
        callables.append(_Callable(f"type({label})", _type_getter(obj), type(obj), ()))
        callables.extend(_record(f"{label}.{m}", _dict_getter(obj, m)) for m in _OPTIMIZER_METHODS)
        registries.extend(_registry(f"{label}.{attr}", _dict_getter(obj, attr)) for attr in _OPTIMIZER_HOOKS)
        groups = _dict_getter(obj, "param_groups")()
        params = []
        for index, group in enumerate(groups if isinstance(groups, list) else ()):
            members = group.get("params", ()) if isinstance(group, dict) else ()
            params.extend((f"{label}.param_groups[{index}][{i}]", p) for i, p in enumerate(members))
        registries.extend(_parameter_registries(params))
    else:
        raise TypeError(f"CodeSnapshot.take() watches torch models and optimizers, not {type(obj).__name__}")
    return callables, registries


def _submodules(root: object, label: str, seen: set[int]) -> Iterator[tuple[str, object]]:
    """Every submodule with its path, walking `_modules` directly (no method of the model runs)."""
    todo: list[tuple[str, object]] = [(label, root)]
    while todo:
        path, module = todo.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield path, module
        children = _dict_getter(module, "_modules")()
        if isinstance(children, dict):
            todo.extend(
                (f"{path}.{name}", child) for name, child in reversed(children.items()) if child is not None
            )


def _parameter_registries(params: Sequence[tuple[str, object]]) -> Iterator[_Registry]:
    seen: set[int] = set()
    for path, param in params:
        if id(param) in seen:
            continue
        seen.add(id(param))
        for attr in _PARAMETER_HOOKS:
            yield _registry(f"{path}.{attr}", _attr_getter(param, attr))


def _type_getter(obj: object) -> Callable[[], object]:
    return lambda: type(obj)


def _dict_getter(obj: object, name: str) -> Callable[[], object]:
    def get() -> object:
        namespace = getattr(obj, "__dict__", None)
        return namespace.get(name, _MISSING) if isinstance(namespace, dict) else _MISSING

    return get


def _override_getter(obj: object, name: str) -> Callable[[], object]:
    """An instance-level override of a method, or _MISSING. The class's own method bound to the same
    object is no override: Lightning assigns `module.forward = module.forward` around training_step."""
    read = _dict_getter(obj, name)

    def get() -> object:
        value = read()
        if (
            isinstance(value, types.MethodType)
            and value.__self__ is obj
            and value.__func__ is _static_get(type(obj), name)
        ):
            return _MISSING
        return value

    return get


def _attr_getter(obj: object, name: str) -> Callable[[], object]:
    return lambda: getattr(obj, name, None)  # tensor hook dicts are C properties, None until first use


def _context() -> _Context:
    wrappers = [
        wrapper
        for module_name, path, inner, wrapped, fixed in _TORCH_WRAPPERS
        if (wrapper := _torch_wrapper(module_name, path, inner, wrapped, fixed)) is not None
    ]
    ddp = sys.modules.get("torch.nn.parallel.distributed")
    ddp_file = getattr(ddp, "__file__", None) if isinstance(ddp, types.ModuleType) else None
    fsdp = sys.modules.get("torch.distributed.fsdp")
    fsdp_file = getattr(fsdp, "__file__", None) if isinstance(fsdp, types.ModuleType) else None
    fsdp_dir = os.path.dirname(fsdp_file) + os.sep if isinstance(fsdp_file, str) else None
    try:
        roots: tuple[str, ...] | None = _default_roots()
    except (TrainguardError, OSError):  # no layout: late-loaded callables go unchecked, the rest still are
        roots = None
    return _Context(tuple(wrappers), ddp_file if isinstance(ddp_file, str) else None, fsdp_dir, roots)


def _torch_wrapper(
    module_name: str, path: str, inner: str, wrapped: str, fixed: Mapping[str, object]
) -> _Wrapper | None:
    """The nested code object `inner` of the function at `path`, when that function is torch's own."""
    module = sys.modules.get(module_name)
    if not isinstance(module, types.ModuleType):
        return None
    maker = _resolve(module, path)
    func = maker.__func__ if isinstance(maker, staticmethod) else maker
    if not isinstance(func, types.FunctionType) or func.__globals__ is not module.__dict__:
        return None
    codes = [c for c in func.__code__.co_consts if isinstance(c, types.CodeType) and c.co_name == inner]
    if len(codes) != 1 or set(codes[0].co_freevars) != {wrapped, *fixed}:
        return None  # another torch version: its rewrite is reported, not guessed at
    return _Wrapper(codes[0], module.__dict__, wrapped, fixed)


def _patched(name: str, message: str) -> EnvFinding:
    return EnvFinding("patched-function", Severity.CRITICAL, name, message, _PATCH_ADVICE)


def _layer_change(old: _Layer, new: _Layer) -> str:
    if not old or not new or old[0] is not new[0]:
        return f"a layer of its __wrapped__ chain is now {_describe(new[0]) if new else 'gone'}"
    if isinstance(new[0], types.FunctionType):
        if old[1] is not new[1]:
            code = new[1]
            return f"__code__ swapped for {_code_where(code if isinstance(code, types.CodeType) else None)}"
        return "default arguments or a closure variable replaced"
    return "partial arguments replaced"


def _code_where(code: types.CodeType | None) -> str:
    if code is None:
        return "no code"
    qualname = getattr(code, "co_qualname", code.co_name)  # 3.11+
    return f"{qualname} from {code.co_filename}:{code.co_firstlineno}"


# ---------------------------------------------------------------------------------------------------
# foreign code


def foreign_code(roots: Sequence[str] | None = None) -> list[EnvFinding]:
    """Critical callables any layer of which runs code from a file outside the environment's roots:
    a patch made before a snapshot was taken."""
    root_dirs = _real_roots(roots) if roots is not None else _default_roots()
    findings = [
        finding
        for name, module, path in _targets()
        for finding in _foreign_layers(name, _resolve(module, path), root_dirs)
    ]
    return sorted(findings, key=EnvFinding.sort_key)


def _foreign_layers(name: str, value: object, roots: Sequence[str]) -> list[EnvFinding]:
    if value is _MISSING:
        return []
    for code in _codes(value):
        if not _code_inside(code, roots):
            return [_patched(name, f"{name} runs {_code_where(code)}, outside the environment.")]
    return []
