"""Templates rendered into a message's subject, text and HTML, in Jinja2's sandbox.

The sandbox refuses attribute access to Python internals (``__class__``,
``__subclasses__``, ...), so a template cannot reach the interpreter; HTML parts are
autoescaped, subject and text are not (they are not HTML).  Output is bounded in size
and rendering in time: both are checked while the output is produced, so a template
that loops for long or writes gigabytes stops with an error.  Rendering is CPU work:
callers run it in a thread.

Every problem is a :obj:`RenderError` that names the template, the part, the line
and, for an undefined variable, the variable.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

from attrs import frozen
from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment, SecurityError

from sendarix.model.template import Template

#: The most characters one rendered part may have.
MAX_OUTPUT = 2 * 1024 * 1024

#: The longest a template may take to render (seconds, all parts together).
MAX_RENDER_SECONDS = 2.0

PARTS = ("subject", "text", "html")


class RenderError(ValueError):
    """A template that does not compile or render; the message says where and why."""


@frozen
class Rendered:
    subject: str | None
    text: str | None
    html: str | None


def _environment(autoescape: bool) -> SandboxedEnvironment:
    return SandboxedEnvironment(
        autoescape=autoescape, undefined=StrictUndefined, keep_trailing_newline=True,
    )


_PLAIN = _environment(False)
_HTML = _environment(True)


def _where(template: Template, part: str, line: int | None) -> str:
    at = f" line {line}" if line else ""
    return f"template {template.name!r} (version {template.version}) {part}{at}"


def check(template: Template) -> None:
    """Raise :obj:`RenderError` when a part does not compile (at save time)."""
    for part in PARTS:
        source = getattr(template, part)
        if source is None:
            continue
        env = _HTML if part == "html" else _PLAIN
        try:
            env.parse(source)
        except TemplateSyntaxError as e:
            raise RenderError(f"{_where(template, part, e.lineno)}: {e.message}") from None


def _line_of(error: BaseException) -> int | None:
    tb = error.__traceback__
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def render(
    template: Template,
    variables: Mapping[str, Any],
    max_output: int = MAX_OUTPUT,
    max_seconds: float = MAX_RENDER_SECONDS,
    clock: Callable[[], float] = time.monotonic,
) -> Rendered:
    """Every part of ``template`` rendered with ``variables``."""
    deadline = clock() + max_seconds
    out: dict[str, str | None] = {}
    for part in PARTS:
        source = getattr(template, part)
        if source is None:
            out[part] = None
            continue
        env = _HTML if part == "html" else _PLAIN
        try:
            compiled = env.from_string(source)
            pieces: list[str] = []
            size = 0
            for piece in compiled.generate(**variables):
                size += len(piece)
                if size > max_output:
                    raise RenderError(
                        f"{_where(template, part, None)}: output larger than {max_output} "
                        "characters"
                    )
                if clock() > deadline:
                    raise RenderError(
                        f"{_where(template, part, None)}: rendering took longer than "
                        f"{max_seconds:g} s"
                    )
                pieces.append(piece)
        except RenderError:
            raise
        except UndefinedError as e:
            name = re.search(r"'([^']+)' is undefined", str(e))
            what = f"variable {name.group(1)!r} is not defined" if name else str(e)
            raise RenderError(f"{_where(template, part, _line_of(e))}: {what}") from None
        except SecurityError as e:
            raise RenderError(
                f"{_where(template, part, _line_of(e))}: not allowed: {e}"
            ) from None
        except TemplateSyntaxError as e:
            raise RenderError(f"{_where(template, part, e.lineno)}: {e.message}") from None
        except (TemplateError, ArithmeticError, TypeError, ValueError, LookupError) as e:
            raise RenderError(f"{_where(template, part, _line_of(e))}: {e}") from None
        text = "".join(pieces)
        if part == "subject":  # one line, whatever the variables held
            text = text.replace("\r", " ").replace("\n", " ").strip()
        out[part] = text
    return Rendered(out["subject"], out["text"], out["html"])
