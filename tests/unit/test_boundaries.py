"""Dependencies point inward (DESIGN.md §3): the engine imports no adapter, and one adapter never
imports another's internals (SMTP reaches the originals through the BlobStore port only)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module (and imported name) a file of `package` imports, relative ones resolved."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def offending(folder: str, forbidden: str) -> list[str]:
    files = sorted((ROOT / folder).rglob("*.py"))
    assert files, f"no Python files under {folder}/"
    return [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in sorted(
            imported_modules(path, "sourceauth." + ".".join(path.relative_to(ROOT).parent.parts))
        )
        if module == forbidden or module.startswith(forbidden + ".")
    ]


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("engine", "sourceauth.adapters"),
        ("adapters/smtp", "sourceauth.adapters.storage"),
        ("adapters/storage", "sourceauth.adapters.smtp"),
    ],
)
def test_dependencies_point_inward(folder: str, forbidden: str) -> None:
    assert offending(folder, forbidden) == []


def test_the_import_scan_sees_relative_and_absolute_imports(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import sourceauth.engine.ports\n"
        "from ..storage.blobs import FileBlobStore\n"
        "from . import dsn\n"
        "def late():\n"
        "    from sourceauth.adapters import storage\n"
    )
    assert imported_modules(sample, "sourceauth.adapters.smtp") == {
        "sourceauth.engine.ports",
        "sourceauth.adapters.storage.blobs",
        "sourceauth.adapters.storage.blobs.FileBlobStore",
        "sourceauth.adapters.smtp",
        "sourceauth.adapters.smtp.dsn",
        "sourceauth.adapters",
        "sourceauth.adapters.storage",
    }
