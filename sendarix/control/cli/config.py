"""``sendarix config``: check and summarise the configuration."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from sendarix.config.loader import describe
from sendarix.config.settings import Config
from sendarix.control.cli.common import (
    Output,
    text_lines,
)

# -- config ------------------------------------------------------------------------


def _config_check(args: argparse.Namespace, config: Config) -> Output:
    """Loading already validated the file (errors exit before any command runs)."""
    return text_lines(describe(config), "configuration OK")


def register(group: Callable[[str, str], Any], common: list[Any], listing: list[Any]) -> None:
    """Add the ``config`` commands."""
    config_cmds = group("config", "check the configuration")
    p = config_cmds.add_parser(
        "check", parents=common, help="validate and summarise the configuration"
    )
    p.set_defaults(plain=_config_check)
