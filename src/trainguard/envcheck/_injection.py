"""Every way code gets to run, or to be found, before the user's own: the injection points of an environment.

Hashes catch a file that was changed; they do not catch a file that was *added* where the interpreter
looks for code on its own: an `import` line in a `.pth` file (site.py executes it at every start), a
`sitecustomize` module, a user site directory, a module placed earlier on `sys.path` than the real one,
an environment variable that preloads a library, or an entry point that `import torch` (or pytest)
loads without being asked. All of it is read from files: nothing of the target is imported or run.

Legitimate noise is recognised exactly, never by pattern: setuptools' `distutils-precedence.pth` only
when its content is one of the known byte strings; an `__editable__` finder only as
`import M; M.install()`. Anything else with an import line is reported.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence

from trainguard.envcheck._dists import Distribution
from trainguard.envcheck._findings import EnvFinding
from trainguard.envcheck._layout import Layout, PathEntry, pth_files, read_small, search_path
from trainguard.findings import Severity

__all__ = ["AUTOLOAD_GROUPS", "find_injections"]

_PTH_CAP = 1 << 20
_SHOWN = 200  # characters of a value or line quoted in a message

# Exact contents of setuptools' distutils-precedence.pth (>= 60 defaults to 'local', 49-59 to 'stdlib').
_DISTUTILS_PRECEDENCE = frozenset(
    (
        "import os; var = 'SETUPTOOLS_USE_DISTUTILS'; enabled = os.environ.get(var, '{}') == 'local'; "
        "enabled and __import__('_distutils_hack').add_shim(); " + end
    ).format(default)
    for default in ("local", "stdlib")
    for end in ("\n", "")
)
# setuptools' PEP 660 editable finder hook, exactly as it writes it.
_EDITABLE_FINDER = re.compile(r"import (__editable___[A-Za-z0-9_]+_finder); \1\.install\(\)\s*")

# Entry-point groups whose plug-ins are imported without the user asking for them, and by whom.
AUTOLOAD_GROUPS: Mapping[str, str] = {
    "torch.backends": "`import torch` imports and calls it automatically (device backend autoload)",
    "torchrun.handlers": "torchrun imports and calls it at every launch, in the agent that starts the "
    "ranks (a rendezvous handler plug-in, registered whether or not the job uses it)",
    "pytest11": "pytest imports it at the start of every test run (a pytest plug-in)",
}
# How to keep each group's plug-ins from loading, where there is a way.
_TURN_OFF: Mapping[str, str] = {
    "torch.backends": " (TORCH_DEVICE_BACKEND_AUTOLOAD=0 turns the torch autoload off)",
    "pytest11": " (pytest -p no:NAME turns a plug-in off)",
}

# Variables that change what code the interpreter (or the dynamic loader) runs or finds, with what
# each does and what to do. PYTHONSAFEPATH and TORCH_DEVICE_BACKEND_AUTOLOAD only ever take code away.
_ENV_VARS: Mapping[str, tuple[Severity, str, str]] = {
    "PYTHONPATH": (
        Severity.HIGH,
        "puts its directories ahead of the standard library and site-packages: a module there replaces "
        "the installed one for every process started with it",
        "Unset it for training jobs, or verify every directory it names and keep them writable only by you.",
    ),
    "PYTHONHOME": (
        Severity.HIGH,
        "moves where the interpreter loads its standard library from, away from the verified install",
        "Unset it; a working environment does not need it.",
    ),
    "PYTHONSTARTUP": (
        Severity.HIGH,
        "names a Python file that every interactive interpreter runs before its first prompt",
        "Unset it, or read the file it names and keep it writable only by you.",
    ),
    "PYTHONUSERBASE": (
        Severity.HIGH,
        "moves the user site directory, whose modules and .pth files the interpreter loads at start-up",
        "Unset it, or verify the directory it names.",
    ),
    "PYTHONWARNINGS": (
        Severity.MEDIUM,
        "sets warning filters at start-up; a filter whose category names a module makes the interpreter "
        "import that module, and filters can hide warnings",
        "Unset it, or check that every filter names only a builtin warning category.",
    ),
    "PYTHONBREAKPOINT": (
        Severity.MEDIUM,
        "names a callable that breakpoint() imports and calls instead of the debugger",
        "Unset it unless you chose that debugger.",
    ),
    "PYTHONINSPECT": (
        Severity.MEDIUM,
        "leaves an interactive prompt open after the script ends, with all of its state",
        "Unset it for unattended jobs.",
    ),
    "PYTHONEXECUTABLE": (
        Severity.MEDIUM,
        "changes what sys.executable reports, so subprocesses and workers may start another interpreter",
        "Unset it.",
    ),
    "PYTHONPLATLIBDIR": (
        Severity.HIGH,
        "changes the library directory the interpreter and site.py search for the standard library and "
        "site-packages",
        "Unset it; the interpreter was built knowing its library directory.",
    ),
    "PYTHONPYCACHEPREFIX": (
        Severity.MEDIUM,
        "makes the interpreter read and write compiled bytecode in a separate tree, outside the "
        "__pycache__ directories this check verifies",
        "Unset it, or verify and protect the directory it names.",
    ),
    "LD_PRELOAD": (
        Severity.HIGH,
        "makes the dynamic loader load the named libraries into every process before any other, "
        "where they can replace any C function (including CUDA and libtorch calls)",
        "Unset it unless you know and verified every library it names.",
    ),
    "LD_AUDIT": (
        Severity.HIGH,
        "makes the dynamic loader load the named audit libraries into every process, with control "
        "over every library it loads",
        "Unset it.",
    ),
    "LD_LIBRARY_PATH": (
        Severity.MEDIUM,
        "makes the dynamic loader search its directories first for shared libraries (CUDA, NCCL and "
        "libtorch dependencies among them)",
        "Check that every directory it names is a trusted install, writable only by its owner.",
    ),
}
_RISKY_ORIGINS = ("PYTHONPATH", "user-site", "pth:")  # entries that can shadow installed modules


def find_injections(
    layout: Layout, dists: Sequence[Distribution], environ: Mapping[str, str]
) -> list[EnvFinding]:
    """Every injection point of the environment `layout` describes, for a process started with
    `environ`; `dists` are its distributions (they tell who installed a file and declare entry points)."""
    owners = {row.location: dist for dist in dists for row in dist.records}
    sites = list(layout.site_dirs)
    if layout.user_site is not None and os.path.isdir(layout.user_site):
        sites.insert(0, layout.user_site)
    entries = search_path(layout, environ)
    modules = {entry.path: _modules(entry.path) for entry in entries}
    findings: list[EnvFinding] = []
    findings += _env_vars(layout, environ)
    for site_dir in sites:
        findings += _pth_findings(layout, site_dir, owners)
        findings += _legacy_editables(site_dir, owners)
    findings += _customize(layout, entries, modules, owners)
    findings += _user_site(layout)
    findings += _shadowed(entries, modules, owners)
    findings += _autoload(dists)
    findings += _editable_dists(dists)
    findings.sort(key=EnvFinding.sort_key)
    return findings


def _shown(value: str) -> str:
    text = value if len(value) <= _SHOWN else value[:_SHOWN] + "..."
    return repr(text)


def _owner_note(dist: Distribution | None) -> str:
    return f" (installed by {dist.name} {dist.version}, listed in its RECORD)" if dist else ""


def _env_vars(layout: Layout, environ: Mapping[str, str]) -> list[EnvFinding]:
    findings = []
    for name, (severity, what, advice) in _ENV_VARS.items():
        value = environ.get(name)
        if not value:
            continue
        if name == "PYTHONUSERBASE" and layout.user_site is None:
            severity = Severity.MEDIUM  # the target disables the user site; another interpreter may not
        if name == "PYTHONWARNINGS" and _warning_imports(value):
            severity = Severity.HIGH
            what = f"makes the interpreter import {', '.join(_warning_imports(value))} at start-up ({what})"
        findings.append(
            EnvFinding(
                kind="env-var",
                severity=severity,
                path=name,
                message=f"{name}={_shown(value)} {what}.",
                advice=advice,
            )
        )
    return findings


def _warning_imports(value: str) -> list[str]:
    """The modules a PYTHONWARNINGS value makes the interpreter import (dotted categories)."""
    modules = []
    for spec in value.split(","):
        fields = spec.split(":")
        category = fields[2].strip() if len(fields) > 2 else ""
        module, dot, _ = category.rpartition(".")
        if dot and module not in ("builtins", "warnings"):
            modules.append(module)
    return modules


def _inside(path: str, roots: Iterable[str]) -> bool:
    """Whether `path`, both as written and with links resolved, lies under one of `roots`."""
    lexical = os.path.normpath(path)
    real = os.path.realpath(path)
    for spelling in (lexical, real):
        if not any(spelling == root or spelling.startswith(root.rstrip("/") + "/") for root in roots):
            return False
    return True


def _env_roots(layout: Layout) -> list[str]:
    roots = {layout.prefix, layout.base_prefix, *layout.site_dirs}
    return sorted({os.path.normpath(r) for r in roots} | {os.path.realpath(r) for r in roots})


def _pth_findings(layout: Layout, site_dir: str, owners: Mapping[str, Distribution]) -> list[EnvFinding]:
    findings = []
    roots = _env_roots(layout)
    for name in pth_files(site_dir, layout.version):
        path = os.path.join(site_dir, name)
        owner = owners.get(os.path.normpath(path))
        data = read_small(path, _PTH_CAP)
        if data is None:
            findings.append(
                EnvFinding(
                    kind="pth-unreadable",
                    severity=Severity.HIGH,
                    path=path,
                    message=f"The .pth file {name} cannot be read (unreadable, not a regular file or over "
                    f"{_PTH_CAP} bytes): site.py runs its import lines at every start, and this check "
                    "cannot tell whether it has any.",
                    advice="Inspect the file by hand and remove it unless an installed package needs it.",
                    distribution=owner.name if owner else None,
                )
            )
            continue
        text = data.decode("utf-8", "surrogateescape")
        if name == "distutils-precedence.pth" and text in _DISTUTILS_PRECEDENCE:
            continue
        lines = [line for line in _pth_lines(text) if not line.startswith("#") and line.strip()]
        imports = [line for line in lines if line.startswith(("import ", "import\t"))]
        paths = [line.rstrip() for line in lines if not line.startswith(("import ", "import\t"))]
        editable = name.startswith("__editable__.") or (owner is not None and owner.editable)
        if editable:
            finders = [m.group(1) for line in imports if (m := _EDITABLE_FINDER.fullmatch(line))]
            imports = [line for line in imports if not _EDITABLE_FINDER.fullmatch(line)]
            added = [os.path.join(site_dir, p) for p in paths] + [
                os.path.join(site_dir, f"{f}.py") + " (finder module)" for f in finders
            ]
            findings.append(
                EnvFinding(
                    kind="editable-install",
                    severity=Severity.MEDIUM,
                    path=path,
                    message=f"The .pth file {name} puts the code of an editable install on the path "
                    f"({', '.join(added) or 'nothing'}){_owner_note(owner)}: that code is not hashed in "
                    "any RECORD and can change at any time.",
                    advice="Install a built wheel instead of an editable install on shared training nodes.",
                    distribution=owner.name if owner else None,
                )
            )
            paths = []
        if imports:
            quoted = "; ".join(_shown(line) for line in imports[:3])
            more = f" and {len(imports) - 3} more" if len(imports) > 3 else ""
            findings.append(
                EnvFinding(
                    kind="pth-import",
                    severity=Severity.HIGH,
                    path=path,
                    message=f"The .pth file {name} has {len(imports)} import line(s) that site.py executes "
                    f"at every interpreter start{_owner_note(owner)}: {quoted}{more}.",
                    advice="Read the code it runs; remove the file unless a package you trust installed "
                    "it for a reason you know.",
                    distribution=owner.name if owner else None,
                )
            )
        outside = [p for p in paths if not _inside(os.path.join(site_dir, p), roots)]
        if outside:
            shown = ", ".join(
                os.path.normpath(os.path.join(site_dir, p))
                + ("" if os.path.exists(os.path.join(site_dir, p)) else " (does not exist yet)")
                for p in outside[:5]
            )
            findings.append(
                EnvFinding(
                    kind="pth-path",
                    severity=Severity.MEDIUM,
                    path=path,
                    message=f"The .pth file {name} adds {len(outside)} director(ies) outside the "
                    f"environment to sys.path{_owner_note(owner)}: {shown}; modules there are imported "
                    "without any hash check.",
                    advice="Remove the line unless you know why it is there, and keep those directories "
                    "writable only by you.",
                    distribution=owner.name if owner else None,
                )
            )
    return findings


def _pth_lines(text: str) -> list[str]:
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[0].startswith("\ufeff"):
        lines[0] = lines[0][1:]
    return lines


def _legacy_editables(site_dir: str, owners: Mapping[str, Distribution]) -> list[EnvFinding]:
    """`setup.py develop` links (`*.egg-link`) and setuptools finder modules with no `__editable__` pth."""
    try:
        names = sorted(os.listdir(site_dir))
    except OSError:
        return []
    pth_text = ""
    for name in names:
        if name.startswith("__editable__.") and name.endswith(".pth"):
            data = read_small(os.path.join(site_dir, name), _PTH_CAP)
            pth_text += data.decode("utf-8", "replace") if data else ""
    findings = []
    for name in names:
        path = os.path.join(site_dir, name)
        if name.endswith(".egg-link"):
            what = "a `setup.py develop` link: the package's code is imported from its source tree"
        elif re.fullmatch(r"__editable___[A-Za-z0-9_]+_finder\.py", name) and name[:-3] not in pth_text:
            what = "an editable-install finder module that no __editable__ .pth file loads"
        else:
            continue
        owner = owners.get(os.path.normpath(path))
        findings.append(
            EnvFinding(
                kind="editable-install",
                severity=Severity.MEDIUM,
                path=path,
                message=f"{name} is {what}{_owner_note(owner)}; that code is not hashed in any RECORD.",
                advice="Install a built wheel instead of an editable install on shared training nodes.",
                distribution=owner.name if owner else None,
            )
        )
    return findings


def _modules(directory: str) -> dict[str, tuple[str, bool]]:
    """The top-level modules a sys.path directory provides: name -> (path, regular), where regular is
    False for a namespace-package portion (a directory without __init__)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return {}
    found: dict[str, tuple[str, bool]] = {}
    for name in sorted(names):
        path = os.path.join(directory, name)
        if os.path.isdir(path):
            if not name.isidentifier() or name == "__pycache__":
                continue
            regular = any(
                os.path.isfile(os.path.join(path, f"__init__{suffix}")) for suffix in (".py", ".pyc")
            ) or any(n.startswith("__init__.") and n.endswith((".so", ".pyd")) for n in _listdir(path))
            if regular or name not in found:
                found[name] = (path, regular)
            continue
        if not name.endswith((".py", ".pyc", ".so", ".pyd", ".pyw")):
            continue
        module = name.split(".", 1)[0]
        if module.isidentifier() and not (module in found and found[module][1]):
            found[module] = (path, True)
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _customize(
    layout: Layout,
    entries: Sequence[PathEntry],
    modules: Mapping[str, Mapping[str, tuple[str, bool]]],
    owners: Mapping[str, Distribution],
) -> list[EnvFinding]:
    findings = []
    names = ["sitecustomize"] + (["usercustomize"] if layout.user_site is not None else [])
    for entry in entries:
        provided = modules[entry.path]
        for module in names:
            if module not in provided or not provided[module][1]:
                continue
            path = provided[module][0]
            owner = owners.get(os.path.normpath(path))
            when = "site.py imports it" if module == "sitecustomize" else "site.py (user site on) imports it"
            findings.append(
                EnvFinding(
                    kind=module,
                    severity=Severity.HIGH,
                    path=path,
                    message=f"A {module} module in {entry.path} ({entry.origin}): {when} at every "
                    f"interpreter start, before any user code{_owner_note(owner)}.",
                    advice="Read it; remove it unless your administrator installed it on purpose.",
                    distribution=owner.name if owner else None,
                )
            )
    return findings


def _user_site(layout: Layout) -> list[EnvFinding]:
    user_site = layout.user_site
    if user_site is None or not os.path.isdir(user_site):
        return []
    names = sorted(_listdir(user_site))
    if not names:
        return []
    listed = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    return [
        EnvFinding(
            kind="user-site",
            severity=Severity.MEDIUM,
            path=user_site,
            message=f"The user site directory is enabled for this interpreter and holds {len(names)} "
            f"entries ({listed}): they are on sys.path ahead of site-packages, and its .pth files run at "
            "every start, outside this environment's records.",
            advice="Empty or remove the user site directory, or run jobs with PYTHONNOUSERSITE=1.",
        )
    ]


def _shadowed(
    entries: Sequence[PathEntry],
    modules: Mapping[str, Mapping[str, tuple[str, bool]]],
    owners: Mapping[str, Distribution],
) -> list[EnvFinding]:
    """A module found in a PYTHONPATH, user-site or .pth-added entry hides the same name further on."""
    first: dict[str, tuple[PathEntry, str]] = {}
    reported: set[str] = set()
    findings = []
    for entry in entries:
        for name, (path, regular) in modules[entry.path].items():
            if name in first:
                earlier, earlier_path = first[name]
                if name not in reported and earlier.origin.startswith(_RISKY_ORIGINS):
                    reported.add(name)
                    owner = owners.get(os.path.normpath(earlier_path))
                    findings.append(
                        EnvFinding(
                            kind="shadowed-module",
                            severity=Severity.HIGH,
                            path=earlier_path,
                            message=f"Module {name!r} in {earlier.path} ({earlier.origin}) comes first on "
                            f"sys.path and is imported instead of {path} ({entry.origin})"
                            f"{_owner_note(owner)}.",
                            advice=f"Remove {earlier_path} or the sys.path entry that brings it in, unless "
                            "you meant to override the installed module.",
                            distribution=owner.name if owner else None,
                        )
                    )
            elif regular:
                first[name] = (entry, path)
    return findings


def _autoload(dists: Sequence[Distribution]) -> list[EnvFinding]:
    findings = []
    for dist in dists:
        for point in dist.entry_points:
            loader = AUTOLOAD_GROUPS.get(point.group)
            if loader is None:
                continue
            findings.append(
                EnvFinding(
                    kind="autoload-entry-point",
                    severity=Severity.HIGH,
                    path=os.path.join(dist.meta_dir, "entry_points.txt"),
                    message=f"{dist.name} {dist.version} declares entry point {point.name!r} in group "
                    f"{point.group!r}, loading {_shown(point.value)}: {loader}.",
                    advice="Check that you installed this distribution on purpose and trust the code it "
                    f"loads; otherwise uninstall it{_TURN_OFF.get(point.group, '')}.",
                    distribution=dist.name,
                    group=point.group,
                )
            )
    return findings


def _editable_dists(dists: Sequence[Distribution]) -> list[EnvFinding]:
    return [
        EnvFinding(
            kind="editable-install",
            severity=Severity.MEDIUM,
            path=dist.meta_dir,
            message=f"{dist.name} {dist.version} is installed in editable mode: its code is imported from "
            f"{dist.editable_location or 'a source tree'}, which no RECORD hashes and anyone who can write "
            "there can change.",
            advice="Install a built wheel instead of an editable install on shared training nodes.",
            distribution=dist.name,
        )
        for dist in dists
        if dist.editable
    ]
