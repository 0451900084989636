"""The library never imports the application: no module outside slora_kernels/app names it."""
import ast
from pathlib import Path

import slora_kernels

PACKAGE = Path(slora_kernels.__file__).parent
APP = "slora_kernels.app"


def _imported_modules(path: Path) -> set[str]:
    """Every module an import statement in `path` names, resolved to an absolute dotted name."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _library_files() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "app" not in p.relative_to(PACKAGE).parts[:-1]]


def test_imports_are_found():
    # The walk itself sees top-level and function-level imports (cli imports commands inside main).
    cli = _imported_modules(PACKAGE / "app" / "cli.py")
    assert {"slora_kernels.app.data", "slora_kernels.app.commands", "slora_kernels._version"} <= cli
    assert PACKAGE / "nn" / "fusion.py" in _library_files()
    assert PACKAGE / "app" / "cli.py" not in _library_files()


def test_library_never_imports_the_application():
    # __main__.py is the `python -m slora_kernels` entry point: it runs the CLI, it is not library.
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p)
                                                     if m == APP or m.startswith(APP + "."))
                 for p in _library_files() if p.name != "__main__.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
