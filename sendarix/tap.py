"""``twistd sendarix``: command-line options and the service maker."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from sendarix.config import ConfigError, load_config, resolve_config


class Options(usage.Options):
    """Options of ``twistd -n sendarix``."""

    synopsis = "[--config PATH]"
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: ./sendarix.toml if "
         "present, else the built-in development default)"],
    ]

    def postOptions(self) -> None:
        try:
            path = self["config"]
            self["parsed"] = load_config(path) if path else resolve_config(None)
        except ConfigError as e:
            raise usage.UsageError(f"configuration error: {e}") from e
        except OSError as e:
            raise usage.UsageError(f"cannot read configuration: {e}") from e


def makeService(options: Options) -> IService:
    """Build the node from parsed options."""
    from sendarix.service import makeService as make_node  # noqa: N813

    try:
        node = make_node(options["parsed"])
        node.reload_on_sighup = True  # SIGHUP reloads the TLS certificate
        return node
    except ConfigError as e:
        sys.stderr.write(f"configuration error: {e}\n")
        raise SystemExit(1) from e
