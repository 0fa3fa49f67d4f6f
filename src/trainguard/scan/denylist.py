"""Names that can run code, touch the system or reach an importer.

This list only grades severity: anything missing from the allowlist is already a finding.
"""

from __future__ import annotations

# Any import from these modules (or their submodules) is critical.
_CRITICAL_MODULES = frozenset(
    """os posix nt posixpath ntpath subprocess sys importlib pkgutil runpy code codeop pty shutil socket
    marshal types timeit ensurepip pip webbrowser ctypes pickle _pickle cPickle dill cloudpickle
    multiprocessing asyncio threading _thread signal urllib http requests ftplib smtplib telnetlib
    xmlrpc inspect bdb pdb cProfile profile trace idlelib lib2to3 pydoc distutils setuptools venv site
    zipimport imp fileinput shelve dbm tempfile glob io _io platform uuid commands popen2 builtins
    __builtin__ copyreg copy_reg functools operator gc weakref sqlite3 tarfile zipfile code ssl
    selectors select _posixsubprocess _osx_support sysconfig atexit logging""".split()
)
# Names that run code or reach an importer, wherever they are imported from.
_CRITICAL_NAMES = frozenset(
    """system popen exec execv execve execvp spawn spawnv spawnl eval compile __import__ import_module
    load loads _load_from_bytes resolve_name run_path run_module _run_code _run_pip runcode runsource
    getattr setattr delattr globals locals vars open input breakpoint apply call check_call check_output
    Popen getoutput getstatusoutput attrgetter methodcaller itemgetter partial reduce runstring
    _get_command_stdout startfile fork forkpty kill remove rmtree unlink write_text write_bytes
    create_subprocess_exec create_subprocess_shell""".split()
)
_CRITICAL_QUALNAMES = frozenset(
    """torch.load torch.hub.load torch.jit.load torch.storage._load_from_bytes torch.serialization.load
    numpy.load numpy.lib.npyio.load numpy.testing._private.utils.runstring numpy.f2py joblib.load
    torch._inductor torch.utils.cpp_extension torch.ops torch.classes torch._dynamo""".split()
)


def is_critical(module: str, name: str) -> bool:
    """True when importing `module`.`name` can run code or reach an importer."""
    root = module.split(".", 1)[0]
    if root in _CRITICAL_MODULES or module in _CRITICAL_MODULES:
        return True
    parts = name.split(".")
    if any(part in _CRITICAL_NAMES for part in parts):
        return True
    full = f"{module}.{name}"
    return any(full == q or full.startswith(q + ".") for q in _CRITICAL_QUALNAMES)
