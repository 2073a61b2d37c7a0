"""Griffe extension: turn the Sphinx roles in the docstrings into mkdocstrings cross-references.

The docstrings are Google style with Sphinx roles (``:class:`PrivacyEngine```,
``:func:`dpcore.audit.gdp_bound```). A role naming an object of the four packages is resolved
from the docstring's own scope outwards, as Python resolves the name, and becomes a link:

- to an object that exists, an optional link: a link where the object has a page, inline code
  where it has none (a private helper, an undocumented attribute);
- to a name that exists nowhere (misspelt, renamed, removed), a required link, which the strict
  build reports as an error: this is the check on broken references.

One exception: ``:attr:`name``` (a bare name) that resolves nowhere stays inline code, since an
instance attribute first assigned outside ``__init__`` cannot be seen without running the code.

A role naming another library's object (``torch``, ``optax``, builtins) stays inline code.
"""

from __future__ import annotations

import builtins
import functools
import pathlib
import re
from typing import Any

import griffe

PACKAGES = ("dpcore", "dp_torch", "dp_jax", "conformance")
ROLE = re.compile(r":(?:py:)?(class|func|meth|mod|data|attr|exc|obj|const):`(~?)\.?([\w.]+)(\(\))?`")


@functools.cache
def _collection(packages: tuple[str, ...], root: pathlib.Path) -> griffe.ModulesCollection:
    """The packages, loaded statically once from ``root``, to tell which names exist."""
    loader = griffe.GriffeLoader(search_paths=[root])
    for package in packages:
        loader.load(package)
    return loader.modules_collection


def _exists(path: str, packages: tuple[str, ...], root: pathlib.Path) -> bool:
    """Whether ``path`` names an object of the packages (following re-exports)."""
    try:
        _collection(packages, root)[path]
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False
    return True


def _target_of(member: Any) -> str:
    """The full path a member stands for: an alias's target, or the member's own path."""
    return member.target_path if member.is_alias else member.path


def _resolve(name: str, scope: Any, packages: tuple[str, ...]) -> str | None:
    """The full path ``name`` means inside ``scope``, or None for another library's object."""
    head, _, rest = name.partition(".")
    if head in packages:
        return name
    inner = scope
    while scope is not None:
        members = _members(scope)
        if head in members:
            path = _target_of(members[head])
            return f"{path}.{rest}" if rest else path
        scope = scope.parent
    if head in dir(builtins):
        return None
    return f"{inner.path}.{name}"  # resolves nowhere: a required link, which the build reports


def _members(scope: Any) -> dict[str, Any]:
    """A scope's names: a class's own and inherited members, a module's members."""
    if scope.is_class:
        try:
            return scope.all_members
        except (griffe.AliasResolutionError, griffe.CyclicAliasError, KeyError):
            return scope.members
    return scope.members


def _rewrite(text: str, scope: Any, packages: tuple[str, ...], root: pathlib.Path) -> str:
    def replace(match: re.Match) -> str:
        role, short, name, call = match.groups()
        shown = (name.rsplit(".", 1)[-1] if short else name) + (call or "")
        path = _resolve(name, scope, packages)
        if path is None or path.partition(".")[0] not in packages:
            return f"`{shown}`"
        if role == "attr" and "." not in name and not _exists(path, packages, root):
            return f"`{shown}`"  # an instance attribute set outside __init__: not visible statically
        if _exists(path, packages, root):
            return f'<autoref identifier="{path}" optional><code>{shown}</code></autoref>'
        return f"[`{shown}`][{path}]"

    return ROLE.sub(replace, text)


class SphinxRoles(griffe.Extension):
    """Rewrites the roles of every docstring in a loaded package.

    Args:
        packages: The packages whose objects get links (the option ``packages`` in
            ``mkdocs.yml``); they are found beside the package being documented.
    """

    def __init__(self, packages: list[str] | tuple[str, ...] = PACKAGES) -> None:
        super().__init__()
        self.packages = tuple(packages)

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name in self.packages:
            root = pathlib.Path(pkg.filepath).resolve().parents[1]
            self._walk(pkg, root)

    def _walk(self, obj: Any, root: pathlib.Path) -> None:
        if obj.docstring is not None:
            scope = obj if (obj.is_class or obj.is_module) else obj.parent
            obj.docstring.value = _rewrite(obj.docstring.value, scope, self.packages, root)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, root)
