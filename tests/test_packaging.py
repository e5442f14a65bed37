"""A wheel holds the whole package: every folder of ``vits_fast/`` with an ``__init__.py`` is listed in
``pyproject.toml``'s packages (an editable install finds an unlisted one, a built wheel silently leaves it out)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "vits_fast").rglob("__init__.py")
             if "kernels" not in init.relative_to(ROOT).parts}  # vits_fast.kernels is the top-level kernels/
    assert {"vits_fast", "vits_fast.train", "vits_fast.monotonic_align"} <= found
    assert found | {"vits_fast.kernels"} <= listed, sorted(found - listed)
    assert setuptools["package-dir"]["vits_fast.kernels"] == "kernels" and (ROOT / "kernels" / "__init__.py").is_file()
