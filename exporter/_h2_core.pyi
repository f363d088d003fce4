"""The compiled twin of exporter.h2.FrameReader (exporter/_h2_core.c)."""

from collections.abc import Callable
from typing import final

from .h2 import Budget, DataFeed

@final
class FrameReader:
    def __init__(
        self,
        *,
        preface: bool,
        on_headers: Callable[[int, bytes, bool], None],
        data_target: Callable[[int], DataFeed | None],
        on_data_end: Callable[[int], None],
        on_rst_stream: Callable[[int, int], None] = ...,
        on_settings: Callable[[bool, list[tuple[int, int]]], None] = ...,
        on_goaway: Callable[[int, int], None] = ...,
        on_push_promise: Callable[[bytes], None] = ...,
        budget: Budget | None = None,
    ) -> None: ...
    @property
    def held(self) -> int: ...
    def feed(self, data: bytes | bytearray | memoryview) -> None: ...
