"""``python -m vits_fast.train``: see :mod:`vits_fast.train`."""

from .cli import run

run()
