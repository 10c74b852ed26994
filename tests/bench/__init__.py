"""The benchmark harness: Sendarix side by side with Postfix (``tox -e bench``).

Not part of the test suite: no module here is named ``test_*``, so trial never
collects it.  ``python -m tests.bench --help`` lists the options; docs/performance.md
describes the method and the latest figures.
"""
