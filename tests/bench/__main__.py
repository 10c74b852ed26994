"""``python -m tests.bench`` (``tox -e bench``): see tests/bench/run.py."""

from tests.bench.run import main

main()
