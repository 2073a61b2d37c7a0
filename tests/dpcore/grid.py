"""The grid of DP-SGD settings on which every accountant is checked against dp-accounting.

Each setting is ``(noise_multiplier, sample_rate, steps, delta)``. Together they span
sigma 0.5-10, q 1e-4-1, steps 1-1e5 and delta 1e-8-1e-3, and avoid only settings
whose epsilon is so large (> ~200) or so small (< ~0.02) that no one trains there.
"""

from __future__ import annotations

GRID: list[tuple[float, float, int, float]] = [
    # small sigma, small q: where the CLT (GDP) approximation under-reports
    (0.5, 0.002, 5000, 1e-7), (0.5, 1e-4, 100000, 1e-5), (0.5, 0.001, 1000, 1e-8),
    (0.6, 0.01, 100, 1e-5), (0.7, 0.004, 10000, 1e-6), (0.8, 0.01, 1000, 1e-5),
    (0.8, 0.05, 1, 1e-6),
    # typical DP-SGD training
    (1.0, 0.01, 1000, 1e-5), (1.0, 0.001, 100000, 1e-6), (1.1, 256 / 60000, 14062, 1e-5),
    (1.1, 0.004, 14000, 1e-5), (1.2, 0.02, 5000, 1e-5), (1.5, 0.04, 2250, 1e-5),
    (1.5, 0.1, 1000, 1e-6), (2.0, 0.05, 10000, 1e-5), (2.0, 0.5, 100, 1e-5),
    (2.0, 1e-4, 100000, 1e-8), (3.0, 0.1, 10000, 1e-8), (4.0, 0.2, 100000, 1e-5),
    (4.0, 1.0, 10, 1e-6), (5.0, 1.0, 100, 1e-5), (10.0, 1.0, 1000, 1e-5),
    (10.0, 0.5, 100000, 1e-3), (8.0, 0.25, 50000, 1e-8),
    # single steps and short runs
    (1.0, 1.0, 1, 1e-5), (0.5, 1.0, 1, 1e-3), (2.0, 1.0, 1, 1e-8),
    (0.9, 0.1, 10, 1e-5), (1.0, 0.5, 10, 1e-3),
    # large q, many steps
    (3.0, 1.0, 1000, 1e-5), (6.0, 0.5, 10000, 1e-6), (1.3, 0.3, 1000, 1e-4),
]
