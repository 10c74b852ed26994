"""The package tree's rules, read from the source with :mod:`ast` (nothing is imported).

Used by ``tests/test_architecture.py`` (the rules must hold) and by
``python -m tests.support.layout`` (prints the module table of docs/architecture.md from
the tree, so the table is regenerated rather than edited by hand).
"""

from __future__ import annotations

import ast
import os
import sys
from collections.abc import Iterable, Iterator

from attrs import frozen

from tests.support.paths import REPO_ROOT

PACKAGE_ROOT = os.path.join(REPO_ROOT, "sendarix")

#: The stages, in the order a message meets them; docs/architecture.md follows it.
STAGES: tuple[str, ...] = (
    "model", "interfaces", "config", "ingress", "cleanup", "stores", "scheduler",
    "routing", "egress", "delivery", "events", "node", "control",
)  # fmt: skip

#: Packages (or single modules) whose code must not do I/O: decisions and values only.
PURE: tuple[str, ...] = (
    "sendarix.model",
    "sendarix.scheduler",
    "sendarix.interfaces",
    "sendarix.routing.rules",
    "sendarix.routing.shaping",
    "sendarix.ingress.policy",
    "sendarix.events.webhooks.signature",
    "sendarix.events.webhooks.schedule",
)

#: Imports that mean I/O (sockets, files through a database, threads, the reactor).
IO_MODULES: tuple[str, ...] = (
    "socket", "ssl", "sqlite3", "subprocess", "asyncio", "threading", "selectors",
    "urllib.request", "http", "txredisapi", "dns", "treq", "OpenSSL",
    "twisted.internet.reactor", "twisted.internet.endpoints", "twisted.internet.threads",
    "twisted.internet.protocol", "twisted.internet.ssl", "twisted.internet.tcp",
    "twisted.internet.task", "twisted.application", "twisted.mail", "twisted.web",
    "twisted.names", "twisted.logger",
)  # fmt: skip

#: The modules that speak a protocol on the wire (or drive those that do).
PROTOCOL_MODULES: tuple[str, ...] = (
    "twisted.mail", "twisted.web", "sendarix.ingress.server", "sendarix.ingress.sasl",
    "sendarix.egress.client", "sendarix.delivery", "sendarix.node", "sendarix.control",
)  # fmt: skip

# Pure modules that may use an I/O-named module for one non-I/O purpose.  Keep short.
PURE_EXCEPTIONS: dict[str, frozenset[str]] = {
    # Event ids stay in creation order within a process: a lock around the counter.
    "sendarix.model.event": frozenset({"threading"}),
}


@frozen
class Violation:
    """One import that breaks a rule."""

    module: str
    imported: str
    rule: str

    def __str__(self) -> str:
        return f"{self.module} imports {self.imported}: {self.rule}"


def module_name(path: str) -> str:
    """The dotted name of a source file below the repository root."""
    rel = os.path.relpath(path, REPO_ROOT)[: -len(".py")]
    parts = rel.split(os.sep)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files(root: str = PACKAGE_ROOT) -> Iterator[str]:
    """Every ``.py`` file of the package, sorted."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(("_", ".")))
        for name in sorted(files):
            if name.endswith(".py"):
                yield os.path.join(folder, name)


def imports_of(source: str, module: str) -> set[str]:
    """Every module ``source`` imports, anywhere in it (functions and TYPE_CHECKING too)."""
    found: set[str] = set()
    package = module if _is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # "from sendarix.egress import client" imports sendarix.egress.client.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def _is_package(module: str) -> bool:
    return os.path.isdir(os.path.join(REPO_ROOT, *module.split(".")))


def _within(name: str, prefixes: Iterable[str]) -> str | None:
    for prefix in prefixes:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def check_module(module: str, imported: set[str]) -> list[Violation]:
    """The rules one module's imports break."""
    out: list[Violation] = []
    own = {name for name in imported if name.startswith("sendarix.")}
    if _within(module, PURE):
        allowed = PURE_EXCEPTIONS.get(module, frozenset())
        for name in sorted(imported):
            hit = _within(name, IO_MODULES)
            if hit and hit not in allowed:
                out.append(Violation(module, name, "a pure module does no I/O"))
    if _within(module, ("sendarix.model",)):
        for name in sorted(own):
            if not _within(name, ("sendarix.model",)):
                out.append(Violation(module, name, "model imports nothing but model"))
    if module == "sendarix.interfaces":
        for name in sorted(own):
            if not _within(name, ("sendarix.model",)):
                out.append(Violation(module, name, "interfaces imports only model"))
    if _within(module, ("sendarix.ingress",)):
        for name in sorted(own):
            if _within(name, ("sendarix.egress", "sendarix.delivery")):
                out.append(Violation(module, name, "ingress never imports egress or delivery"))
    if _within(module, ("sendarix.stores",)):
        for name in sorted(imported):
            if _within(name, PROTOCOL_MODULES):
                out.append(Violation(module, name, "stores never import protocol code"))
    if _within(module, ("sendarix.scheduler",)):
        for name in sorted(own):
            if not _within(name, ("sendarix.model", "sendarix.scheduler", "sendarix.config",
                                  "sendarix.interfaces", "sendarix.routing.shaping")):
                out.append(Violation(module, name, "the scheduler decides; it calls no stage"))
    if not _within(module, ("sendarix.node", "sendarix.control")):
        for name in sorted(own):
            if _within(name, ("sendarix.node", "sendarix.control")):
                out.append(Violation(module, name, "only node and control assemble the others"))
    return out


def violations(root: str = PACKAGE_ROOT) -> list[Violation]:
    """Every rule broken anywhere in the package."""
    out: list[Violation] = []
    for path in source_files(root):
        module = module_name(path)
        with open(path, encoding="utf-8") as f:
            out.extend(check_module(module, imports_of(f.read(), module)))
    return out


def top_level_names(root: str = PACKAGE_ROOT) -> list[str]:
    """The names directly under ``sendarix/`` (``__init__.py`` and caches left out)."""
    return sorted(
        name[: -len(".py")] if name.endswith(".py") else name
        for name in os.listdir(root)
        if not name.startswith(("_", ".")) and (name.endswith(".py") or
                                                os.path.isdir(os.path.join(root, name)))
    )


def summary(path: str) -> str:
    """The first sentence (or first paragraph line) of a module's docstring."""
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = doc.strip().split("\n\n")[0].replace("\n", " ")
    return " ".join(first.split())


def module_table(root: str = PACKAGE_ROOT) -> str:
    """The module table of docs/architecture.md: stage by stage, one row per module."""
    rows = ["| module | what it is |", "|---|---|"]
    files = list(source_files(root))

    def stage_of(path: str) -> int:
        top = os.path.relpath(path, root).split(os.sep)[0].removesuffix(".py")
        return STAGES.index(top) if top in STAGES else len(STAGES)

    for path in sorted(files, key=lambda p: (stage_of(p), p)):
        rel = os.path.relpath(path, REPO_ROOT)
        if rel == os.path.join("sendarix", "__init__.py") or rel.endswith("__main__.py"):
            continue
        text = summary(path).replace("|", "\\|")
        rows.append(f"| `{rel}` | {text} |")
    return "\n".join(rows) + "\n"


TABLE_START = "<!-- module table: generated by `python -m tests.support.layout` -->"
TABLE_END = "<!-- end of module table -->"


def table_in(doc: str) -> str:
    """The generated block of ``doc`` (between the markers)."""
    start = doc.index(TABLE_START) + len(TABLE_START)
    return doc[start : doc.index(TABLE_END)].strip("\n") + "\n"


def write_table(doc_path: str) -> None:
    """Rewrite the module table of ``doc_path`` from the tree."""
    with open(doc_path, encoding="utf-8") as f:
        doc = f.read()
    start = doc.index(TABLE_START) + len(TABLE_START)
    end = doc.index(TABLE_END)
    doc = doc[:start] + "\n" + module_table() + doc[end:]
    with open(doc_path, "w", encoding="utf-8") as f:
        f.write(doc)


if __name__ == "__main__":
    write_table(os.path.join(REPO_ROOT, "docs", "architecture.md"))
    broken = violations()
    for v in broken:
        print(v)
    sys.exit(1 if broken else 0)
