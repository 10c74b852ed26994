"""The package tree keeps its shape: stage packages, import rules, the documented table.

These tests read the source with :mod:`ast`; see :mod:`tests.support.layout`.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from tests.support import layout
from tests.support.paths import REPO_ROOT


class ImportRuleTests(SynchronousTestCase):
    """The rules hold for the whole package."""

    def test_no_rule_broken(self) -> None:
        """No module of sendarix/ breaks an import rule."""
        broken = layout.violations()
        self.assertEqual([str(v) for v in broken], [])

    def test_top_level_is_the_stages(self) -> None:
        """At most 13 names under sendarix/, each one a stage of the message's path."""
        names = layout.top_level_names()
        self.assertLessEqual(len(names), 13)
        self.assertEqual(sorted(set(names) - set(layout.STAGES)), [])

    def test_every_module_says_what_it_is(self) -> None:
        """Every module opens with a docstring (the documented table is made of them)."""
        missing = [
            os.path.relpath(path, REPO_ROOT)
            for path in layout.source_files()
            if not layout.summary(path) and not path.endswith("__main__.py")
        ]
        self.assertEqual(missing, [])


class RuleCheckerTests(SynchronousTestCase):
    """The checker itself: each rule reports a module that breaks it."""

    def rules(self, module: str, source: str) -> set[str]:
        return {v.rule for v in layout.check_module(module, layout.imports_of(source, module))}

    def test_pure_module_with_io(self) -> None:
        """A scheduler module that opens sockets or uses the reactor is reported."""
        for source in ("import socket", "from twisted.internet import reactor",
                       "from twisted.internet.task import LoopingCall", "import sqlite3"):
            self.assertIn("a pure module does no I/O",
                          self.rules("sendarix.scheduler.core", source), source)

    def test_pure_module_without_io(self) -> None:
        """Value imports in a pure module are fine."""
        source = "from attrs import frozen\nfrom sendarix.model.message import Reply\n"
        self.assertEqual(self.rules("sendarix.scheduler.core", source), set())

    def test_io_inside_a_function_counts(self) -> None:
        """An import hidden in a function body is still an import."""
        source = "def f():\n    import txredisapi\n"
        self.assertIn("a pure module does no I/O", self.rules("sendarix.model.x", source))

    def test_interfaces_import_only_model(self) -> None:
        """interfaces.py reaching into an implementation is reported, TYPE_CHECKING too."""
        source = (
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from sendarix.stores.credentials import Credential\n"
        )
        self.assertIn("interfaces imports only model", self.rules("sendarix.interfaces", source))
        self.assertEqual(
            self.rules("sendarix.interfaces", "from sendarix.model.event import Event"), set()
        )

    def test_model_imports_only_model(self) -> None:
        self.assertIn(
            "model imports nothing but model",
            self.rules("sendarix.model.message", "from sendarix.config import units"),
        )

    def test_ingress_never_imports_egress(self) -> None:
        for source in ("from sendarix.egress import client", "import sendarix.delivery.service",
                       "from ..egress.client import deliver"):
            self.assertIn("ingress never imports egress or delivery",
                          self.rules("sendarix.ingress.server", source), source)

    def test_stores_never_import_protocols(self) -> None:
        for source in ("from twisted.mail import smtp", "from sendarix.ingress.server import X",
                       "from sendarix.delivery import service"):
            self.assertIn("stores never import protocol code",
                          self.rules("sendarix.stores.redis.spool", source), source)

    def test_only_node_and_cli_assemble(self) -> None:
        self.assertIn(
            "only node and control assemble the others",
            self.rules("sendarix.delivery.service", "from sendarix.node.service import X"),
        )
        self.assertEqual(
            self.rules("sendarix.control.cli.main", "from sendarix.node.service import X"), set()
        )

    def test_relative_imports_resolved(self) -> None:
        """``from . import x`` inside a package names that package's module."""
        self.assertEqual(
            layout.imports_of("from . import ready", "sendarix.scheduler.core"),
            {"sendarix.scheduler", "sendarix.scheduler.ready"},
        )


class DocumentedTableTests(SynchronousTestCase):
    """docs/architecture.md's module table is the tree's (regenerate it, never hand-edit)."""

    def test_table_matches_tree(self) -> None:
        with open(os.path.join(REPO_ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
            documented = layout.table_in(f.read())
        self.assertEqual(
            documented,
            layout.module_table(),
            "docs/architecture.md is out of date: run python -m tests.support.layout",
        )
