"""The README's "Where things are" map names every public module of the four packages."""

from __future__ import annotations

import pathlib
import pkgutil
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dpcore", "dp_torch", "dp_jax", "conformance")
SECTION = "## Where things are"


def public_modules() -> list[str]:
    """Every module and package under the four packages with no ``_``-prefixed part."""
    found = list(PACKAGES)
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if not any(part.startswith("_") for part in info.name.split(".")):
                found.append(info.name)
    return sorted(found)


def map_rows() -> list[set[str]]:
    """The backticked names of each row of the README's map table."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert SECTION + "\n" in text, f"README.md has no {SECTION!r} section"
    section = text.split(SECTION + "\n", 1)[1].split("\n## ", 1)[0]
    return [set(re.findall(r"`([\w.]+)`", line)) for line in section.splitlines() if line.startswith("|")]


def named(module: str, rows: list[set[str]]) -> bool:
    """Whether a row names ``module`` whole, or its package and the rest of its path."""
    parts = module.split(".")
    splits = [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(1, len(parts))]
    return any(module in row or any(p in row and s in row for p, s in splits) for row in rows)


def test_public_modules_are_found() -> None:
    modules = public_modules()
    assert "dp_torch.privacy_engine" in modules and "dpcore.sampling" in modules


@pytest.mark.parametrize("module", public_modules())
def test_readme_map_names_module(module: str) -> None:
    assert named(module, map_rows()), (
        f"{module} is public but README.md's {SECTION!r} table does not name it; add it to the "
        "row of its concept (or give the module a leading underscore if it is private)."
    )
