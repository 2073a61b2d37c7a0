"""``dp_torch`` against the whole public API of Opacus 1.6.

For every module of Opacus (found with ``pkgutil.walk_packages``; tests excluded) the
public names are its ``__all__`` when it has one, otherwise the classes and functions
defined in that module (plus its plain constants) whose names do not start with ``_``;
names merely imported from elsewhere are checked in the module that defines them. For
each public name ``dp_torch`` must have the same module and the same name there, and:

* for a function, a compatible signature: every parameter Opacus accepts is accepted with
  the same kind (positional-only, positional-or-keyword, keyword-only, ``*args``,
  ``**kwargs``) and, if positional, at the same position; a parameter with a default in
  Opacus has one here; parameters only dp_torch has must be optional;
* for a class, the same of ``__init__`` (when an Opacus class defines it) and of every
  public method an Opacus class defines; other public attributes must exist.

Every difference is either listed in :data:`DIFFERS_ON_PURPOSE`, with its reason, or in
:data:`KNOWN_GAPS` (work not done yet; empty now, and an entry that no longer matches a
difference fails the suite so that it gets removed). :data:`DIFFERS_ON_PURPOSE`
must equal the README's "Differs from Opacus on purpose" section, bullet for bullet,
and every entry must still describe a real difference.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
import types
from collections.abc import Callable
from typing import Any, Optional

import pytest

opacus = pytest.importorskip("opacus")

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Differs from Opacus on purpose"

#: Opacus path (module, or canonical ``module.Class.method`` / ``module.function``) -> reason.
#: A module entry covers everything under it. Kept equal to the README section (the long
#: form of each reason is in docs/opacus_differences.md).
DIFFERS_ON_PURPOSE: dict[str, str] = {
    "opacus.grad_sample.grad_sample_module_fast_gradient_clipping_tp":
        "tensor parallelism is not provided; FSDP2 is (`grad_sample_mode=\"ghost_fsdp\"`).",
    "opacus.accountants.analysis.prv":
        "internals of Opacus' PRV code; dpcore's PRV accountant has no such objects.",
    "opacus.utils.adaptive_clipping":
        'divides by the realised batch size, which leaks it; use `make_private(clipping="adaptive")`.',
    "opacus.accountants.accountant.IAccountant.get_epsilon":
        "every option has a name; no `*args`.",
    "opacus.accountants.rdp.RDPAccountant.get_epsilon":
        "an unknown keyword raises instead of being ignored.",
    "opacus.accountants.prv.PRVAccountant.get_epsilon":
        "an unknown keyword raises instead of being ignored.",
    "opacus.grad_sample.grad_sample_module.GradSampleHooks.capture_activations_hook":
        "a forward hook with keyword inputs: `(module, args, kwargs, output)`.",
    "opacus.grad_sample.grad_sample_module.GradSampleHooks.capture_backprops_hook":
        "backprops come from a gradient hook on each call's own output.",
    "opacus.grad_sample.grad_sample_module.GradSampleHooks.rearrange_grad_samples":
        "takes the recorded call and its backprops.",
    "opacus.grad_sample.grad_sample_module_fast_gradient_clipping.GradSampleHooksFastGradientClipping.capture_activations_hook":
        "as `GradSampleHooks.capture_activations_hook`.",
    "opacus.grad_sample.grad_sample_module_fast_gradient_clipping.GradSampleHooksFastGradientClipping.capture_backprops_hook":
        "as `GradSampleHooks.capture_backprops_hook`.",
    "opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp.GradSampleHooksFastGradientClippingFSDP.capture_activations_hook":
        "as `GradSampleHooks.capture_activations_hook`.",
    "opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp.GradSampleHooksFastGradientClippingFSDP.capture_backprops_hook":
        "as `GradSampleHooks.capture_backprops_hook`.",
    "opacus.optimizers.ddpoptimizer.DistributedDPOptimizer.reduce_gradients":
        "the all-reduce is part of `add_noise`, before scaling and accounting.",
    "opacus.optimizers.ddpoptimizer_fast_gradient_clipping.DistributedDPOptimizerFastGradientClipping.reduce_gradients":
        "as `DistributedDPOptimizer.reduce_gradients`.",
    "opacus.layers.dp_multihead_attention.DPMultiheadAttention.forward":
        "follows `nn.MultiheadAttention.forward` (keeps `average_attn_weights`).",
    "opacus.layers.dp_multihead_attention.DPMultiheadAttention.state_dict":
        "follows `nn.Module.state_dict`.",
    "opacus.layers.dp_multihead_attention.DPMultiheadAttention.unsqueeze_0_2":
        "not needed: state dicts are renamed by hooks.",
    "opacus.layers.dp_rnn.DPRNNBase.forward":
        "the second parameter is torch's `hx`; `state_init` is accepted as a keyword.",
    "opacus.layers.param_rename.RenameParamsMixin.load_state_dict":
        "renaming goes through state-dict hooks; no override needed.",
    "opacus.layers.param_rename.filter_out_old_keys":
        "renaming goes through state-dict hooks; each parameter is kept once.",
}

#: Differences that are not on purpose: work still to do. Opacus path -> what is missing.
KNOWN_GAPS: dict[str, str] = {}

_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


# --------------------------------------------------------------------------- signatures


def _positional(params: list[inspect.Parameter]) -> list[inspect.Parameter]:
    return [p for p in params if p.kind in _POSITIONAL]


def _variadic_problems(theirs: list[inspect.Parameter], ours: list[inspect.Parameter]) -> list[str]:
    problems = []
    for kind in _VARIADIC:
        if any(p.kind == kind for p in theirs) and not any(p.kind == kind for p in ours):
            problems.append(f"no {'*args' if kind == inspect.Parameter.VAR_POSITIONAL else '**kwargs'}")
    return problems


def _named_problems(theirs: list[inspect.Parameter], ours: list[inspect.Parameter]) -> list[str]:
    problems = []
    by_name = {p.name: p for p in ours}
    positions = {p.name: i for i, p in enumerate(_positional(ours))}
    for i, p in enumerate(_positional(theirs)):
        if p.name in positions and positions[p.name] != i:
            problems.append(f"parameter {p.name!r} at position {positions[p.name]}, Opacus has it at {i}")
    for p in theirs:
        if p.kind in _VARIADIC:
            continue
        q = by_name.get(p.name)
        if q is None:
            problems.append(f"parameter {p.name!r} missing")
        elif q.kind != p.kind:
            problems.append(f"parameter {p.name!r} is {q.kind.description}, Opacus has {p.kind.description}")
        elif p.default is not p.empty and q.default is q.empty:
            problems.append(f"parameter {p.name!r} is required, Opacus gives it a default")
    return problems


def signature_problems(theirs: Callable, ours: Callable) -> list[str]:
    """Why ``ours`` cannot take every call ``theirs`` takes (empty when it can)."""
    try:
        sig_theirs, sig_ours = inspect.signature(theirs), inspect.signature(ours)
    except (TypeError, ValueError):
        return []  # a builtin without a signature on one side: nothing to compare
    p_theirs, p_ours = list(sig_theirs.parameters.values()), list(sig_ours.parameters.values())
    problems = _variadic_problems(p_theirs, p_ours) + _named_problems(p_theirs, p_ours)
    known = {p.name for p in p_theirs}
    for q in p_ours:
        if q.name not in known and q.kind not in _VARIADIC and q.default is q.empty:
            problems.append(f"extra parameter {q.name!r} is required")
    return problems


# --------------------------------------------------------------------------- public names


def _is_routine_or_class(obj: Any) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj)


def _is_opacus_object(obj: Any) -> bool:
    return _is_routine_or_class(obj) and (getattr(obj, "__module__", "") or "").split(".")[0] == "opacus"


def _key(module_name: str, name: str, obj: Any) -> str:
    """Canonical Opacus path of a public name (where a class or function is defined)."""
    if _is_opacus_object(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return f"{module_name}.{name}"


def public_names(module: types.ModuleType) -> list[str]:
    """``__all__`` (names Opacus really has), else the public names defined in ``module``."""
    if hasattr(module, "__all__"):
        return [n for n in module.__all__ if hasattr(module, n)]  # Opacus 1.6 lists one typo
    names = []
    for name, obj in vars(module).items():
        if name.startswith("_") or isinstance(obj, types.ModuleType):
            continue
        if _is_routine_or_class(obj):
            if obj.__module__ == module.__name__:
                names.append(name)
        elif type(obj).__module__ == "builtins":
            names.append(name)
    return names


def _defining_class(cls: type, name: str) -> Optional[type]:
    return next((c for c in cls.__mro__ if name in vars(c)), None)


def _class_problems(key: str, theirs: type, ours: Any) -> list[tuple[str, str]]:
    if not inspect.isclass(ours):
        return [(key, f"is a {type(ours).__name__} in dp_torch, a class in Opacus")]
    problems = []
    init_owner = _defining_class(theirs, "__init__")
    if init_owner is not None and init_owner.__module__.startswith("opacus"):
        init_key = f"{init_owner.__module__}.{init_owner.__qualname__}.__init__"
        problems += [(init_key, p) for p in signature_problems(theirs.__init__, ours.__init__)]
    for name in dir(theirs):
        owner = _defining_class(theirs, name)
        if name.startswith("_") or owner is None or not owner.__module__.startswith("opacus"):
            continue
        member_key = f"{owner.__module__}.{owner.__qualname__}.{name}"
        if not hasattr(ours, name):
            problems.append((member_key, "missing"))
            continue
        raw = inspect.getattr_static(theirs, name)
        if isinstance(raw, (types.FunctionType, staticmethod, classmethod)):
            problems += [(member_key, p) for p in signature_problems(getattr(theirs, name), getattr(ours, name))]
    return problems


def _name_problems(module_name: str, name: str, theirs: Any, ours_module: types.ModuleType) -> list[tuple[str, str]]:
    key = _key(module_name, name, theirs)
    if not hasattr(ours_module, name):
        return [(key, f"missing from dp_torch{module_name[len('opacus'):]}")]
    ours = getattr(ours_module, name)
    if inspect.isclass(theirs):
        return _class_problems(key, theirs, ours)
    if inspect.isfunction(theirs):
        if not callable(ours):
            return [(key, "not callable in dp_torch")]
        return [(key, p) for p in signature_problems(theirs, ours)]
    return []


def opacus_modules() -> list[str]:
    """Every Opacus module name, tests excluded, the top-level package first."""
    found = ["opacus"]
    for info in pkgutil.walk_packages(opacus.__path__, "opacus.", onerror=lambda name: None):
        if ".tests" not in info.name and not info.name.endswith(".tests"):
            found.append(info.name)
    return found


def module_problems(module_name: str) -> list[tuple[str, str]]:
    """``(Opacus path, what differs)`` for one Opacus module."""
    try:
        theirs = importlib.import_module(module_name)
    except ImportError as err:
        return [(module_name, f"Opacus module cannot be imported here ({err})")]
    ours_name = "dp_torch" + module_name[len("opacus"):]
    try:
        ours = importlib.import_module(ours_name)
    except ImportError as err:
        return [(module_name, f"{ours_name} is missing ({err})")]
    problems: list[tuple[str, str]] = []
    for name in public_names(theirs):
        problems += _name_problems(module_name, name, getattr(theirs, name), ours)
    return sorted(set(problems))


def _covered_by(key: str, table: dict[str, str]) -> Optional[str]:
    return next((entry for entry in table if key == entry or key.startswith(entry + ".")), None)


MODULES = opacus_modules()


@pytest.fixture(scope="module")
def all_problems() -> list[tuple[str, str]]:
    return sorted({p for module_name in MODULES for p in module_problems(module_name)})


# --------------------------------------------------------------------------- the comparison


@pytest.mark.parametrize("module_name", MODULES)
def test_module_matches_opacus(module_name: str) -> None:
    unlisted = [
        f"{key}: {what}"
        for key, what in module_problems(module_name)
        if _covered_by(key, DIFFERS_ON_PURPOSE) is None and _covered_by(key, KNOWN_GAPS) is None
    ]
    assert not unlisted, (
        f"dp_torch differs from {module_name} in ways listed nowhere; add the missing API, or "
        "list the difference (with its reason) in DIFFERS_ON_PURPOSE and the README:\n"
        + "\n".join(unlisted)
    )


def test_every_listed_difference_is_still_real(all_problems: list[tuple[str, str]]) -> None:
    listed = {**DIFFERS_ON_PURPOSE, **KNOWN_GAPS}
    used = {_covered_by(key, listed) for key, _ in all_problems}
    stale = sorted(set(listed) - used)
    assert not stale, f"these entries no longer match any difference from Opacus; remove them: {stale}"


def test_deliberate_and_gaps_do_not_overlap() -> None:
    both = [k for k in KNOWN_GAPS if _covered_by(k, DIFFERS_ON_PURPOSE) or k in DIFFERS_ON_PURPOSE]
    assert not both


# --------------------------------------------------------------------------- the README


def readme_differences(text: str) -> dict[str, str]:
    """The ``- `opacus.x`: reason`` bullets of the README section, reasons on one line."""
    start = text.index(SECTION + "\n")
    rest = text[start + len(SECTION) + 1:]
    end = re.search(r"^## ", rest, flags=re.MULTILINE)
    section = rest[: end.start()] if end else rest
    entries: dict[str, str] = {}
    current: Optional[str] = None
    for line in section.splitlines():
        bullet = re.match(r"^- `(opacus(?:\.\w+)*)`:\s*(.*)$", line)
        if bullet:
            current = bullet.group(1)
            assert current not in entries, f"{current} is listed twice in the README"
            entries[current] = bullet.group(2).strip()
        elif current is not None and line.startswith("  ") and line.strip():
            entries[current] = f"{entries[current]} {line.strip()}".strip()
        else:
            current = None
    return entries


def _normalise(text: str) -> str:
    return " ".join(text.split())


def test_readme_section_equals_the_table() -> None:
    text = README.read_text(encoding="utf-8")
    assert SECTION + "\n" in text, f"README.md has no {SECTION!r} section"
    listed = {key: _normalise(reason) for key, reason in readme_differences(text).items()}
    table = {key: _normalise(reason) for key, reason in DIFFERS_ON_PURPOSE.items()}
    assert sorted(listed) == sorted(table), (
        f"only in the README: {sorted(set(listed) - set(table))}; "
        f"only in DIFFERS_ON_PURPOSE: {sorted(set(table) - set(listed))}"
    )
    for key in table:
        assert listed[key] == table[key], f"reason for {key} differs:\nREADME: {listed[key]}\ntest:   {table[key]}"


# --------------------------------------------------------------------------- the checker itself


def _f_base(a, b=1, *args, c, d=2, **kwargs): ...
def _f_same_plus_optional(a, b=1, *args, c, d=2, e=3, **kwargs): ...
def _f_missing_param(a, *args, c, d=2, **kwargs): ...
def _f_kind_changed(a, *, b=1, c, d=2, **kwargs): ...
def _f_swapped(b=1, a=None, *args, c, d=2, **kwargs): ...
def _f_required(a, b, *args, c, d=2, **kwargs): ...
def _f_extra_required(a, b=1, *args, c, d=2, e, **kwargs): ...
def _f_no_varargs(a, b=1, *, c, d=2): ...


@pytest.mark.parametrize(
    ("ours", "expected"),
    [
        (_f_base, []),
        (_f_same_plus_optional, []),
        (_f_missing_param, ["parameter 'b' missing"]),
        (_f_kind_changed, ["no *args", "parameter 'b' is keyword-only, Opacus has positional or keyword"]),
        (_f_swapped, ["parameter 'a' at position 1, Opacus has it at 0",
                      "parameter 'b' at position 0, Opacus has it at 1"]),
        (_f_required, ["parameter 'b' is required, Opacus gives it a default"]),
        (_f_extra_required, ["extra parameter 'e' is required"]),
        (_f_no_varargs, ["no *args", "no **kwargs"]),
    ],
)
def test_signature_checker(ours: Callable, expected: list[str]) -> None:
    assert signature_problems(_f_base, ours) == expected


def test_checker_sees_a_missing_method_and_a_missing_name() -> None:
    class Theirs:
        __module__ = "opacus.fake"

        def kept(self, x): ...

        def dropped(self): ...

    class Ours:
        def kept(self, x, y=0): ...

    assert _class_problems("opacus.fake.Theirs", Theirs, Ours) == [
        (f"opacus.fake.{Theirs.__qualname__}.dropped", "missing")
    ]
    empty = types.ModuleType("dp_torch.fake")
    assert _name_problems("opacus.fake", "Theirs", Theirs, empty) == [
        (f"opacus.fake.{Theirs.__qualname__}", "missing from dp_torch.fake")
    ]


def test_readme_parser_reads_wrapped_and_long_bullets() -> None:
    text = (
        "intro\n## Differs from Opacus on purpose\n\n- A behaviour, not a name.\n"
        "- `opacus.a.b`: first\n  second.\n- `opacus.very.long.key`:\n  reason here.\n\n"
        "## Next\n- `opacus.c`: outside the section\n"
    )
    assert readme_differences(text) == {"opacus.a.b": "first second.", "opacus.very.long.key": "reason here."}
