"""Fixtures shared by the end-to-end tests: the real switchdb, and a scripted provider."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.stack import open_stack
from tests.upstream import scripted_provider


@pytest.fixture
async def stack(tmp_path: Path):
    async with open_stack(tmp_path) as s:
        yield s


@pytest.fixture
async def provider():
    async with scripted_provider() as p:
        yield p
