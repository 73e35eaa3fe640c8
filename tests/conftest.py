"""Shared fixtures."""

from __future__ import annotations

import pytest
from _helpers import TinyDenoiser


@pytest.fixture
def tiny_denoiser() -> TinyDenoiser:
    return TinyDenoiser(3 * 8 * 8)
