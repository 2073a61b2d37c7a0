"""The privacy ledger: exact JSON round trip and re-accounting with any kind."""

from __future__ import annotations

import json
import struct
import warnings

import pytest

from dpcore import ledger as ledger_mod
from dpcore.accounting import RDPAccountant, create_accountant
from dpcore.ledger import Ledger, load_ledger, save_ledger

AWKWARD = [(0.1 + 0.2, 256 / 60000, 3), (1 / 3, 1e-4 * 7, 1), (2.0**-20, 1.0, 5)]


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_round_trip_is_bit_exact(tmp_path) -> None:
    acc = RDPAccountant()
    for nm, q, n in AWKWARD:
        acc.step(noise_multiplier=nm, sample_rate=q, num_steps=n)
    path = tmp_path / "ledger.json"
    save_ledger(acc, path)
    back = load_ledger(path)
    assert back.mechanism == "rdp" and back.total_steps == 9
    for (a, b, c), (x, y, z) in zip(back.entries, AWKWARD):
        assert _bits(a) == _bits(x) and _bits(b) == _bits(y) and c == z
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sigma 2**-20: the optimum is the smallest order
        assert back.to_accountant().get_epsilon(1e-5) == acc.get_epsilon(1e-5)


@pytest.mark.parametrize("kind", ["rdp", "prv", "pld", "gdp"])
def test_loads_into_every_kind(kind: str) -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=200)
    text = Ledger.from_accountant(acc).to_json()
    other = Ledger.from_json(text).to_accountant(kind)
    reference = create_accountant(kind)
    reference.step(noise_multiplier=1.1, sample_rate=0.01, num_steps=200)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert other.get_epsilon(1e-5) == reference.get_epsilon(1e-5)
    assert other.history == acc.history


def test_json_layout() -> None:
    data = json.loads(Ledger(entries=((1.0, 0.5, 2),), mechanism="prv").to_json())
    assert data["format"] == ledger_mod.FORMAT and data["format_version"] == 1
    assert data["entries"] == [{"noise_multiplier": 1.0, "sample_rate": 0.5, "num_steps": 2}]
    assert data["library_version"]


def test_entries_merge_and_validate() -> None:
    led = Ledger(entries=((1.0, 0.1, 2), (1.0, 0.1, 3)))
    assert led.entries == ((1.0, 0.1, 5),)
    with pytest.raises(ValueError, match=r"history\[0\].sample_rate"):
        Ledger(entries=((1.0, 0.0, 2),))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not valid JSON"),
        ('{"format": "other"}', "not a dp-parity ledger"),
        ('{"format": "dp-parity-ledger", "format_version": 9, "entries": []}', "format_version 9"),
        ('{"format": "dp-parity-ledger", "format_version": 1, "entries": {}}', "'entries' must be a list"),
        ('{"format": "dp-parity-ledger", "format_version": 1, "entries": [{"noise_multiplier": 1}]}',
         r"entries\[0\] must have exactly the keys"),
    ],
)
def test_bad_json(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Ledger.from_json(text)


def test_no_mechanism_needs_a_kind() -> None:
    with pytest.raises(ValueError, match="pass kind="):
        Ledger(entries=((1.0, 0.1, 1),)).to_accountant()


def test_loading_into_an_accountant_replaces_its_history() -> None:
    acc = RDPAccountant()
    acc.step(noise_multiplier=3.0, sample_rate=0.2)
    Ledger(entries=((1.0, 0.1, 4),)).load_into(acc)
    assert acc.history == [(1.0, 0.1, 4)]
