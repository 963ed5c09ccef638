"""Helpers shared by the test layers (``tests/unit``, ``integration``, ``faults``,
``browser``): no test module imports another test module, they import from here.

Handler modules that ``taskq worker`` subprocesses load by dotted path live here
too (``tests.support.misbehaving``); such a child gets the repository's root on
its ``PYTHONPATH`` (:data:`ROOT`).
"""

from pathlib import Path

#: The repository's root (the folder holding ``pyproject.toml`` and ``tests/``).
ROOT = Path(__file__).resolve().parents[2]
