"""Registers the echo backend with cc50tw (found by twisted.plugin.getPlugins)."""

from cc50_echo.backend import SPEC as echo

__all__ = ["echo"]
