"""Compatibility path: the argument checks now live in :mod:`dpcore.checks`."""

from dpcore.checks import *  # noqa: F401,F403
