"""Where a Python environment keeps its code, worked out from files alone.

The environment being checked may be the one under attack, so its interpreter is never run: running it
would execute its `.pth` files and `sitecustomize` before we had looked at them. Instead the layout is
read from `pyvenv.cfg` and the directory tree, following the rules of CPython's `getpath` and `site`
(`search_path` rebuilds the `sys.path` that interpreter would start with, `.pth` path lines included).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
import sysconfig
from collections.abc import Mapping

from trainguard.errors import UsageError

__all__ = [
    "Layout",
    "PathEntry",
    "pth_files",
    "read_pth_lines",
    "read_small",
    "resolve_layout",
    "search_path",
]

_VERSION_DIR = re.compile(r"python(\d+)\.(\d+)")
_CFG_CAP = 64 << 10  # pyvenv.cfg is a few lines
_PTH_CAP = 1 << 20  # a .pth file bigger than this is not read for path lines (injection reports it)


@dataclasses.dataclass(frozen=True)
class Layout:
    """The directories of one environment: a venv, or an install prefix."""

    prefix: str
    base_prefix: str
    version: tuple[int, int]
    is_venv: bool
    system_site: bool
    executable: str | None
    stdlib: str
    dynload: str | None
    site_dirs: tuple[str, ...]
    user_site: str | None
    bin_dir: str


@dataclasses.dataclass(frozen=True)
class PathEntry:
    """One `sys.path` entry of the target and why it is there (`origin`)."""

    path: str
    origin: str  # PYTHONPATH, stdlib-zip, stdlib, lib-dynload, user-site, site-packages, pth:<file>


def resolve_layout(
    *, python: str | None = None, prefix: str | None = None, environ: Mapping[str, str] | None = None
) -> Layout:
    """The layout of the environment of `python` (an interpreter path, never run), of `prefix` (a venv or
    an install prefix), or, when both are None, of the running interpreter."""
    env = os.environ if environ is None else environ
    if python is not None and prefix is not None:
        raise UsageError("give either an interpreter or a prefix, not both")
    if python is not None:
        return _from_python(python, env)
    if prefix is not None:
        return _from_prefix(prefix, env, executable=None)
    return _running(env)


def search_path(layout: Layout, environ: Mapping[str, str]) -> list[PathEntry]:
    """The `sys.path` the target interpreter builds at start-up (no script directory), read from files.

    PYTHONPATH first, then the standard library, then the user site and the site directories, each
    followed by the directories its `.pth` files add (files in name order, as site.py does). PYTHONHOME
    moves the standard library (and, outside a venv, the site directories) as it would for the target.
    """
    entries: list[PathEntry] = []
    known: set[str] = set()

    def add(path: str, origin: str) -> None:
        key = os.path.normcase(os.path.abspath(path))
        if key not in known:
            known.add(key)
            entries.append(PathEntry(os.path.abspath(path), origin))

    pythonpath = environ.get("PYTHONPATH")
    for part in pythonpath.split(os.pathsep) if pythonpath else ():
        add(part, "PYTHONPATH")  # relative (and empty) entries are the target's cwd: ours stands in
    base, exec_base = layout.base_prefix, layout.base_prefix
    site_dirs = list(layout.site_dirs)
    home = environ.get("PYTHONHOME")
    if home:
        base, _, rest = home.partition(os.pathsep)
        exec_base = rest or base
    major, minor = layout.version
    if home:
        stdlib = _stdlib_dir(base, layout.version)
        dynload: str | None = os.path.join(_stdlib_dir(exec_base, layout.version), "lib-dynload")
        if not layout.is_venv:
            site_dirs = _site_dirs(base, layout.version)
    else:
        stdlib, dynload = layout.stdlib, layout.dynload
    add(os.path.join(os.path.dirname(stdlib), f"python{major}{minor}.zip"), "stdlib-zip")
    add(stdlib, "stdlib")
    if dynload is not None:
        add(dynload, "lib-dynload")
    # site.py adds a venv's own site-packages first, then the user site, then the base's site-packages.
    own = [d for d in site_dirs if layout.is_venv and _under(d, layout.prefix)]
    sites = [(d, "site-packages") for d in own if os.path.isdir(d)]
    if layout.user_site is not None and os.path.isdir(layout.user_site):
        sites.append((layout.user_site, "user-site"))
    sites.extend((d, "site-packages") for d in site_dirs if d not in own and os.path.isdir(d))
    for site_dir, origin in sites:
        add(site_dir, origin)
        for name in pth_files(site_dir, layout.version):
            pth = os.path.join(site_dir, name)
            for line in read_pth_lines(pth):
                if line.startswith(("import ", "import\t")):
                    continue
                target = os.path.join(site_dir, line.rstrip())
                if os.path.exists(target):
                    add(target, f"pth:{pth}")
    return entries


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def pth_files(site_dir: str, version: tuple[int, int]) -> list[str]:
    """The `.pth` file names site.py processes in `site_dir`, in its order (hidden ones skipped from 3.13)."""
    try:
        names = os.listdir(site_dir)
    except OSError:
        return []
    names = [n for n in names if n.endswith(".pth")]
    if version >= (3, 13):
        names = [n for n in names if not n.startswith(".")]
    return sorted(names)


def read_pth_lines(path: str, cap: int = _PTH_CAP) -> list[str]:
    """The lines of a `.pth` file that site.py acts on (no comments, no blank lines), split as its text
    reader splits them; [] when unreadable or over `cap` (the caller reports that)."""
    data = read_small(path, cap)
    if data is None:
        return []
    text = data.decode("utf-8", "surrogateescape")
    lines = re.split(r"\r\n|\r|\n", text)
    if lines and lines[0].startswith("\ufeff"):  # 3.13 reads utf-8-sig: a BOM does not hide an import
        lines[0] = lines[0][1:]
    return [line for line in lines if not line.startswith("#") and line.strip()]


def read_small(path: str, cap: int) -> bytes | None:
    """The bytes of a regular file no bigger than `cap`, else None (never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > cap:
            return None
        chunks: list[bytes] = []
        total = 0
        while total <= cap:
            chunk = os.read(fd, cap + 1 - total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return None if total > cap else b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _running(environ: Mapping[str, str]) -> Layout:
    prefix = os.path.abspath(sys.prefix)
    base = os.path.abspath(sys.base_prefix)
    version = (sys.version_info[0], sys.version_info[1])
    is_venv = prefix != base
    system_site = True
    if is_venv:
        system_site = _system_site(_read_cfg(os.path.join(prefix, "pyvenv.cfg")))
    stdlib = os.path.abspath(sysconfig.get_paths()["stdlib"])
    return _build(prefix, base, version, is_venv, system_site, sys.executable or None, stdlib, environ)


def _from_python(python: str, environ: Mapping[str, str]) -> Layout:
    path = os.path.abspath(python)
    if not os.path.exists(path):
        raise UsageError(f"interpreter {python} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"interpreter {python} is a directory; use --prefix for an environment directory")
    bin_dir = os.path.dirname(path)
    for candidate in (os.path.dirname(bin_dir), bin_dir):
        if os.path.isfile(os.path.join(candidate, "pyvenv.cfg")):
            return _from_prefix(candidate, environ, executable=python)
    real = os.path.realpath(path)
    real_bin = os.path.dirname(real)
    if os.path.basename(real_bin) != "bin":
        raise UsageError(
            f"cannot tell the environment of interpreter {python}: {real} is not in a bin/ directory "
            "and there is no pyvenv.cfg next to it",
            hint="name the environment directory with --prefix",
        )
    match = _VERSION_DIR.fullmatch(os.path.basename(real))
    version = (int(match.group(1)), int(match.group(2))) if match else None
    return _from_prefix(os.path.dirname(real_bin), environ, executable=python, version=version)


def _from_prefix(
    prefix: str,
    environ: Mapping[str, str],
    *,
    executable: str | None,
    version: tuple[int, int] | None = None,
) -> Layout:
    root = os.path.abspath(prefix)
    if not os.path.exists(root):
        raise UsageError(f"environment directory {prefix} does not exist")
    if not os.path.isdir(root):
        raise UsageError(f"environment directory {prefix} is not a directory")
    cfg_path = os.path.join(root, "pyvenv.cfg")
    is_venv = os.path.isfile(cfg_path)
    cfg = _read_cfg(cfg_path) if is_venv else {}
    if version is None:
        version = _cfg_version(cfg) if is_venv else None
    if version is None:
        version = _lib_version(root)
    if version is None:
        raise UsageError(
            f"{prefix} is not a Python environment: no pyvenv.cfg and no single lib/pythonX.Y directory",
            hint="name a venv directory or the prefix of a Python installation",
        )
    if is_venv:
        home = cfg.get("home")
        if not home:
            raise UsageError(f"{cfg_path} has no 'home' line: cannot find the base interpreter")
        base = _base_from_home(home, version)
        system_site = _system_site(cfg)
    else:
        base = root
        system_site = True
    if executable is None:
        executable = _find_executable(os.path.join(root, "bin"), version)
    stdlib = _stdlib_dir(base, version)
    return _build(root, base, version, is_venv, system_site, executable, stdlib, environ)


def _build(
    prefix: str,
    base: str,
    version: tuple[int, int],
    is_venv: bool,
    system_site: bool,
    executable: str | None,
    stdlib: str,
    environ: Mapping[str, str],
) -> Layout:
    dynload = os.path.join(stdlib, "lib-dynload")
    site_dirs = _site_dirs(prefix, version)
    if is_venv and system_site:
        site_dirs += [d for d in _site_dirs(base, version) if d not in site_dirs]
    user_site = None
    if (not is_venv or system_site) and not environ.get("PYTHONNOUSERSITE"):
        user_site = _user_site(version, environ)
    return Layout(
        prefix=prefix,
        base_prefix=base,
        version=version,
        is_venv=is_venv,
        system_site=system_site,
        executable=executable,
        stdlib=stdlib,
        dynload=dynload if os.path.isdir(dynload) else None,
        site_dirs=tuple(site_dirs),
        user_site=user_site,
        bin_dir=os.path.join(prefix, "bin"),
    )


def _site_dirs(prefix: str, version: tuple[int, int]) -> list[str]:
    """site.getsitepackages() for one prefix: lib64 first where it is a real directory (platlibdir lib64),
    Debian's dist-packages scheme where the prefix has lib/python3/dist-packages; existing ones only."""
    ver = f"python{version[0]}.{version[1]}"
    if os.path.isdir(os.path.join(prefix, "lib", "python3", "dist-packages")):
        candidates = [
            os.path.join(prefix, "local", "lib", ver, "dist-packages"),
            os.path.join(prefix, "lib", "python3", "dist-packages"),
            os.path.join(prefix, "lib", ver, "dist-packages"),
        ]
    else:
        candidates = []
        if not os.path.islink(os.path.join(prefix, "lib64")):
            candidates.append(os.path.join(prefix, "lib64", ver, "site-packages"))
        candidates.append(os.path.join(prefix, "lib", ver, "site-packages"))
    return [c for c in candidates if os.path.isdir(c)]


def _stdlib_dir(base: str, version: tuple[int, int]) -> str:
    ver = f"python{version[0]}.{version[1]}"
    lib64 = os.path.join(base, "lib64", ver)
    if os.path.isfile(os.path.join(lib64, "os.py")) and not os.path.islink(os.path.join(base, "lib64")):
        return lib64
    return os.path.join(base, "lib", ver)


def _user_site(version: tuple[int, int], environ: Mapping[str, str]) -> str:
    base = environ.get("PYTHONUSERBASE")
    if not base:
        home = environ.get("HOME") or os.path.expanduser("~")
        base = os.path.join(home, ".local")
    return os.path.join(base, "lib", f"python{version[0]}.{version[1]}", "site-packages")


def _base_from_home(home: str, version: tuple[int, int]) -> str:
    """The install prefix of the interpreter in `home`: the nearest parent holding lib/pythonX.Y/os.py,
    as getpath searches for its landmark; the parent of `home` when none does."""
    ver = f"python{version[0]}.{version[1]}"
    current = os.path.abspath(home)
    while True:
        for lib in ("lib", "lib64"):
            if os.path.isfile(os.path.join(current, lib, ver, "os.py")):
                return current
        parent = os.path.dirname(current)
        if parent == current:
            return os.path.dirname(os.path.abspath(home))
        current = parent


def _find_executable(bin_dir: str, version: tuple[int, int]) -> str | None:
    for name in ("python", "python3", f"python{version[0]}.{version[1]}"):
        path = os.path.join(bin_dir, name)
        if os.path.isfile(path):
            return path
    return None


def _read_cfg(path: str) -> dict[str, str]:
    """pyvenv.cfg as site.py reads it: `key = value` lines, keys lower-cased, the rest ignored."""
    data = read_small(path, _CFG_CAP)
    if data is None:
        if os.path.exists(path):
            raise UsageError(f"cannot read {path}: unreadable, not a regular file or bigger than 64 KiB")
        return {}
    values: dict[str, str] = {}
    for line in data.decode("utf-8", "replace").splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip().lower()] = value.strip()
    return values


def _system_site(cfg: Mapping[str, str]) -> bool:
    """site.py's reading: only the exact word true (any case) turns it on, and a missing key does too."""
    return cfg.get("include-system-site-packages", "true").lower() == "true"


def _cfg_version(cfg: Mapping[str, str]) -> tuple[int, int] | None:
    for key in ("version_info", "version"):
        match = re.match(r"(\d+)\.(\d+)", cfg.get(key, ""))
        if match:
            return int(match.group(1)), int(match.group(2))
    return None


def _lib_version(root: str) -> tuple[int, int] | None:
    found: set[tuple[int, int]] = set()
    for lib in ("lib", "lib64"):
        try:
            names = os.listdir(os.path.join(root, lib))
        except OSError:
            continue
        for name in names:
            match = _VERSION_DIR.fullmatch(name)
            if match and os.path.isdir(os.path.join(root, lib, name)):
                found.add((int(match.group(1)), int(match.group(2))))
    return found.pop() if len(found) == 1 else None
