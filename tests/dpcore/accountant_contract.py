"""The contract every accountant kind must honour; each kind's tests inherit it."""

from __future__ import annotations

import math
import warnings

import pytest

from dpcore.accounting import Accountant


class AccountantContract:
    """Inherit and set ``kind`` (a registered name) and ``make()``."""

    kind: str = ""
    delta = 1e-5

    def make(self) -> Accountant:
        raise NotImplementedError

    def epsilon(self, acc: Accountant, delta: float | None = None) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # GDP warns on every query; tested elsewhere
            return acc.get_epsilon(self.delta if delta is None else delta)

    def test_mechanism_is_registry_name(self) -> None:
        assert self.make().mechanism() == self.kind

    def test_empty_history_has_zero_epsilon(self) -> None:
        acc = self.make()
        assert len(acc) == 0 and acc.history == []
        assert self.epsilon(acc) == 0.0

    def test_identical_steps_merge(self) -> None:
        acc = self.make()
        for _ in range(3):
            acc.step(noise_multiplier=1.0, sample_rate=0.01)
        acc.step(noise_multiplier=1.0, sample_rate=0.01, num_steps=7)
        acc.step(noise_multiplier=2.0, sample_rate=0.01)
        acc.step(noise_multiplier=1.0, sample_rate=0.01)
        assert acc.history == [(1.0, 0.01, 10), (2.0, 0.01, 1), (1.0, 0.01, 1)]
        assert len(acc) == 12

    def test_merged_and_unmerged_histories_agree(self) -> None:
        one, many = self.make(), self.make()
        one.step(noise_multiplier=1.1, sample_rate=0.02, num_steps=50)
        for _ in range(50):
            many.step(noise_multiplier=1.1, sample_rate=0.02)
        assert one.history == many.history
        assert self.epsilon(one) == self.epsilon(many)

    def test_epsilon_grows_with_steps(self) -> None:
        previous = 0.0
        for steps in (1, 10, 100, 1000):
            acc = self.make()
            acc.step(noise_multiplier=1.0, sample_rate=0.02, num_steps=steps)
            eps = self.epsilon(acc)
            assert eps > previous
            previous = eps

    def test_zero_noise_gives_infinite_epsilon(self) -> None:
        acc = self.make()
        acc.step(noise_multiplier=0.0, sample_rate=0.01)
        assert self.epsilon(acc) == math.inf

    @pytest.mark.parametrize(
        ("kwargs", "match"),
        [
            (dict(noise_multiplier=-1.0, sample_rate=0.1), "noise_multiplier must be a finite"),
            (dict(noise_multiplier=float("nan"), sample_rate=0.1), "noise_multiplier"),
            (dict(noise_multiplier=1.0, sample_rate=0.0), r"0 < sample_rate <= 1, got 0.0"),
            (dict(noise_multiplier=1.0, sample_rate=1.5), r"got 1.5"),
            (dict(noise_multiplier=1.0, sample_rate=0.1, num_steps=0), "num_steps must be"),
        ],
    )
    def test_rejected_step_keeps_history(self, kwargs: dict, match: str) -> None:
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=3)
        before = acc.history
        with pytest.raises(ValueError, match=match):
            acc.step(**kwargs)
        assert acc.history == before and len(acc) == 3

    def test_wrong_type_is_a_type_error(self) -> None:
        acc = self.make()
        with pytest.raises(TypeError, match="noise_multiplier must be a real number"):
            acc.step(noise_multiplier="1.0", sample_rate=0.1)
        assert acc.history == []

    @pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0])
    def test_bad_delta_rejected_without_change(self, delta: float) -> None:
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
        with pytest.raises(ValueError, match=rf"0 < delta < 1, got {delta!r}"):
            acc.get_epsilon(delta)
        assert acc.history == [(1.0, 0.1, 1)]

    def test_state_dict_round_trip(self) -> None:
        acc = self.make()
        acc.step(noise_multiplier=1.3, sample_rate=0.05, num_steps=20)
        acc.step(noise_multiplier=0.9, sample_rate=0.01, num_steps=5)
        state = acc.state_dict()
        assert state["mechanism"] == self.kind
        fresh = self.make()
        fresh.load_state_dict(state)
        assert fresh.history == acc.history
        assert self.epsilon(fresh) == self.epsilon(acc)

    @pytest.mark.parametrize(
        ("state", "match"),
        [
            ({"mechanism": "rdp"}, "'history' key"),
            ({"history": [(1.0, 0.1)]}, r"history\[0\] must be a"),
            ({"history": [(1.0, 0.1, 2), (1.0, 2.0, 1)]}, r"history\[1\].sample_rate"),
            ({"history": [(-1.0, 0.1, 2)]}, r"history\[0\].noise_multiplier"),
            ("not a dict", "must be a mapping"),
        ],
    )
    def test_bad_state_dict_changes_nothing(self, state: object, match: str) -> None:
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.1, num_steps=4)
        with pytest.raises(ValueError, match=match):
            acc.load_state_dict(state)  # type: ignore[arg-type]
        assert acc.history == [(1.0, 0.1, 4)]

    def test_history_is_a_copy(self) -> None:
        acc = self.make()
        acc.step(noise_multiplier=1.0, sample_rate=0.1)
        acc.history.append((5.0, 0.5, 1))
        assert acc.history == [(1.0, 0.1, 1)]

    def test_optimizer_hook_steps_once_per_call(self) -> None:
        acc = self.make()

        class FakeOptimizer:
            noise_multiplier = 1.2
            accumulated_iterations = 2

        hook = acc.get_optimizer_hook_fn(sample_rate=0.01)
        hook(FakeOptimizer())
        hook(FakeOptimizer())
        assert acc.history == [(1.2, 0.02, 2)]
