"""Two connected streams that are not keyed: ``a.connect(b)`` with a :class:`CoMapFunction`,
:class:`CoFlatMapFunction` or :class:`CoProcessFunction` (Flink's co-functions).

The operator has two logical inputs: the task tells it which one each buffer came from, and it
calls the function's method for that input (``map1``/``map2``, ...). The two inputs share the
function object (and so its attributes and operator state) in each subtask; there is no order
between records of different inputs. The operator's watermark is the minimum over both inputs,
idle inputs left out (see ``StreamTask._advance_watermark``), and it ends when both ended.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from runtime.api.functions import Collector, ProcessContext, RichFunction
from runtime.api.operators import FlatMapOperator, MapOperator, ProcessOperator

IN1 = TypeVar("IN1")
IN2 = TypeVar("IN2")
OUT = TypeVar("OUT")


class CoMapFunction(RichFunction, Generic[IN1, IN2, OUT]):
    """Maps each record of input 1 with ``map1`` and each record of input 2 with ``map2``."""

    def map1(self, value: IN1) -> OUT:
        raise NotImplementedError

    def map2(self, value: IN2) -> OUT:
        raise NotImplementedError


class CoFlatMapFunction(RichFunction, Generic[IN1, IN2, OUT]):
    """Turns each record of input 1 (``flat_map1``) and of input 2 (``flat_map2``) into zero or
    more records (an iterable)."""

    def flat_map1(self, value: IN1) -> Any:
        raise NotImplementedError

    def flat_map2(self, value: IN2) -> Any:
        raise NotImplementedError


class CoProcessFunction(RichFunction, Generic[IN1, IN2, OUT]):
    """Processes each record of input 1 (``process_element1``) and input 2
    (``process_element2``) with a collector and a :class:`~runtime.api.functions.ProcessContext`
    (the record's timestamp, side outputs through ``ctx.output(tag, value)``, processing time and
    the watermark). No keyed state and no timers: ``key_by(k1, k2)`` and a
    ``KeyedCoProcessFunction`` for those."""

    def process_element1(self, value: IN1, ctx: ProcessContext, out: Collector[OUT]) -> None:
        raise NotImplementedError

    def process_element2(self, value: IN2, ctx: ProcessContext, out: Collector[OUT]) -> None:
        raise NotImplementedError


class CoMapOperator(MapOperator):
    """Runs a :class:`CoMapFunction`: ``map1`` on input 1, ``map2`` on input 2."""

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fn = self.function
        if input_index == 0:
            await self._map_values(fn.map1, "map1() of the co-map function", values, timestamps)
        else:
            await self._map_values(fn.map2, "map2() of the co-map function", values, timestamps)


class CoFlatMapOperator(FlatMapOperator):
    """Runs a :class:`CoFlatMapFunction`: ``flat_map1`` on input 1, ``flat_map2`` on input 2."""

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fn = self.function
        method = fn.flat_map1 if input_index == 0 else fn.flat_map2
        role = f"{method.__name__}() of the co-flat-map function"
        await self._flat_map_values(method, role, values, timestamps)


class CoProcessOperator(ProcessOperator):
    """Runs a :class:`CoProcessFunction` on two non-keyed inputs: one context (the time service
    and side outputs) for both."""

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fn = self.function
        process = fn.process_element1 if input_index == 0 else fn.process_element2
        await self._process_unkeyed(values, timestamps, process, self._ctx)
