"""The package's layering: no two egd modules import each other, directly or through others; the gateway
never imports the launcher script, only the protocol module both share.

Imports made only for type checking count too (``if TYPE_CHECKING:``): a cycle there is still two modules that
each need the other to be understood, the coupling the kernel manager's split removed (``egd.kernels.kernel``
and ``egd.metrics`` imported each other).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import egd

ROOT = Path(egd.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The egd modules ``path`` imports anywhere (module level, functions, ``TYPE_CHECKING`` blocks)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found & modules


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    result: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_no_import_cycles_between_egd_modules() -> None:
    """Every egd module can be read (and imported) without the modules that import it."""
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    graph = {name: _imports(path, modules) - {name} for name, path in paths.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check above can fail: two modules importing each other form a cycle."""
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]


def test_the_gateway_does_not_import_the_launcher_script() -> None:
    """egd and its drivers use the launcher protocol module (``egd.launchers.launcher_protocol``), never the
    launcher script, which runs on the hosts."""
    code = ("import sys, egd.cli, egd.server, egd.remote, egd.drivers.local, egd.drivers.ssh, egd.drivers.yarn; "
            "print('egd.launchers.kernel_launcher' in sys.modules, 'egd.launchers.launcher_protocol' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert done.stdout.split() == ["False", "True"]


def test_a_copy_of_the_launcher_is_its_two_files(tmp_path: Path) -> None:
    """A launcher copied to a host (the files of ``LAUNCHER_FILES``, side by side) runs with a bare Python and
    nothing of egd; the script alone does not (it needs its protocol module)."""
    from egd.drivertools import DEFAULT_LAUNCHER, LAUNCHER_FILES

    source = Path(DEFAULT_LAUNCHER).parent
    for name in LAUNCHER_FILES:
        shutil.copyfile(source / name, tmp_path / name)
    bare = [sys.executable, "-E", "-S", str(tmp_path / "kernel_launcher.py"), "--help"]
    assert subprocess.run(bare, capture_output=True, timeout=60).returncode == 0
    (tmp_path / "launcher_protocol.py").unlink()
    alone = subprocess.run(bare, capture_output=True, text=True, timeout=60)
    assert alone.returncode != 0 and "launcher_protocol" in alone.stderr
