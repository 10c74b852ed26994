"""Template rendering in the sandbox, without I/O."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from sendarix.ingress.render import RenderError, check, render
from sendarix.model.template import Template


def template(text: str | None = None, html: str | None = None,
             subject: str | None = None) -> Template:
    return Template("acme", "welcome", 3, subject, text, html, 0.0)


class RenderTests(SynchronousTestCase):
    def test_parts_and_escaping(self) -> None:
        """HTML is autoescaped, text and subject are not; the subject is one line."""
        out = render(template("Dear {{ name }}", "<p>{{ name }}</p>", "Hi\n{{ name }}"),
                     {"name": "<Bob & Co>"})
        self.assertEqual(out.text, "Dear <Bob & Co>")
        self.assertEqual(out.html, "<p>&lt;Bob &amp; Co&gt;</p>")
        self.assertEqual(out.subject, "Hi <Bob & Co>")

    def test_python_internals_are_out_of_reach(self) -> None:
        for source in ("{{ ''.__class__.__mro__[1].__subclasses__() }}",
                       "{{ name.__init__.__globals__ }}",
                       "{{ cycler.__init__.__globals__.os }}",
                       "{{ '{0.__class__.__mro__}'.format(name) }}"):
            with self.assertRaises(RenderError, msg=source) as caught:
                render(template(source), {"name": "x"})
            self.assertIn("template 'welcome' (version 3) text", str(caught.exception))

    def test_undefined_variable_named_with_its_line(self) -> None:
        with self.assertRaises(RenderError) as caught:
            render(template("one\ntwo {{ first_name }}"), {})
        self.assertIn("line 2", str(caught.exception))
        self.assertIn("'first_name' is not defined", str(caught.exception))

    def test_output_and_time_are_bounded(self) -> None:
        with self.assertRaises(RenderError) as caught:
            render(template("{% for i in range(100000) %}xxxxxxxxxx{% endfor %}"), {},
                   max_output=1000)
        self.assertIn("larger than 1000", str(caught.exception))
        ticks = iter(range(1000))
        with self.assertRaises(RenderError) as caught:
            render(template("{% for i in range(500) %}x{% endfor %}"), {}, max_seconds=10,
                   clock=lambda: float(next(ticks)))
        self.assertIn("longer than 10 s", str(caught.exception))

    def test_syntax_errors_at_save(self) -> None:
        with self.assertRaises(RenderError) as caught:
            check(template(html="<p>\n{% if x %}\n</p>"))
        self.assertIn("html line", str(caught.exception))
        check(template("{{ ok }}"))

    @given(st.dictionaries(st.from_regex(r"[a-z]{1,8}", fullmatch=True),
                           st.text(max_size=50), max_size=5))
    def test_any_variables_render_or_fail_cleanly(self, variables: dict[str, str]) -> None:
        """Whatever the variables, rendering gives text or a RenderError, nothing else."""
        source = "{% for k, v in vars.items() %}{{ k }}={{ v }};{% endfor %}{{ vars|length }}"
        try:
            out = render(template(source, "<b>{{ vars }}</b>"), {"vars": variables})
        except RenderError:
            return
        assert out.text is not None and out.html is not None
        self.assertTrue(out.text.endswith(str(len(variables))))
        self.assertNotIn("<script", out.html.replace("&lt;script", ""))
