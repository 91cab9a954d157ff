"""Shared by the benchmark tests: a cached hardware profile, so no test measures one."""

from __future__ import annotations

from ..planning.test_hardware import seed_profile

__all__ = ["seed_profile"]
