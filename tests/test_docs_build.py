"""The documentation site builds with warnings as errors, and a broken reference breaks it.

The site is ``mkdocs.yml`` at the repository root: the pages in ``docs/`` and an API reference
generated from the docstrings (mkdocstrings). ``docs/_ext/sphinx_roles.py`` turns the
docstrings' Sphinx roles into cross-references; a role naming nothing that exists must fail
the strict build, which the second test checks on a small package of its own.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("mkdocs", reason="the docs extra is not installed: pip install -e '.[docs]'")
pytest.importorskip("mkdocstrings_handlers.python", reason="the docs extra is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXTENSION = ROOT / "docs" / "_ext" / "sphinx_roles.py"


def build(config: pathlib.Path, site: pathlib.Path) -> subprocess.CompletedProcess:
    """``mkdocs build --strict`` of ``config`` into ``site``, from the config's folder."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent, capture_output=True, text=True, timeout=600,
    )


def test_docs_site_builds_strict(tmp_path: pathlib.Path) -> None:
    result = build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "dp_jax" / "index.html").exists()


def small_project(root: pathlib.Path, docstring: str) -> pathlib.Path:
    """A package ``demo_pkg`` with one documented function, and a site for it."""
    (root / "demo_pkg").mkdir()
    (root / "demo_pkg" / "__init__.py").write_text(textwrap.dedent(f'''
        """Demo package."""

        __all__ = ["helper", "user"]


        def helper() -> None:
            """Help."""


        def user() -> None:
            """{docstring}"""
        '''))
    (root / "docs").mkdir()
    (root / "docs" / "index.md").write_text("# Demo\n\n::: demo_pkg\n")
    (root / "mkdocs.yml").write_text(textwrap.dedent(f"""
        site_name: demo
        plugins:
          - autorefs
          - mkdocstrings:
              handlers:
                python:
                  paths: [.]
                  options:
                    docstring_style: google
                    extensions:
                      - {EXTENSION}:SphinxRoles:
                          packages: [demo_pkg]
        """))
    return root / "mkdocs.yml"


def test_role_to_an_existing_object_becomes_a_link(tmp_path: pathlib.Path) -> None:
    config = small_project(tmp_path, "Use :func:`helper`, like :class:`int`.")
    result = build(config, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    assert 'href="#demo_pkg.helper"' in html


def test_role_to_a_missing_object_fails_the_build(tmp_path: pathlib.Path) -> None:
    config = small_project(tmp_path, "Use :func:`helpr`.")
    result = build(config, tmp_path / "site")
    assert result.returncode != 0
    assert "demo_pkg.helpr" in result.stderr
