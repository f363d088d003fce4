"""Every observer a unit test builds is a TwinObserver (tests/unit/twin.py): compared
with its other-core twin when the test ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit import twin


@pytest.fixture(autouse=True)
def check_twins() -> Iterator[None]:
    twin.forget()  # what an earlier test left when it failed
    yield
    twin.check_all()
