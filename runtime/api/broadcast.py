"""The broadcast state pattern (Flink's): rules or reference data sent to every subtask and kept in
broadcast state, read by the records of another stream.

::

    RULES = MapStateDescriptor("rules")
    rules = job.from_source(...).broadcast(RULES)        # a BroadcastStream
    events.key_by(user).connect(rules).process(MyKeyedBroadcastFunction())
    events.connect(rules).process(MyBroadcastFunction())  # not keyed

The broadcast input goes to every subtask (broadcast partitioning), where
``process_broadcast_element`` may change the broadcast state; ``process_element`` (the other
input) and ``on_timer`` get a read-only view of it, so that every subtask changes its copy alike
and all copies stay the same (as long as those changes depend on the broadcast records only, not
on the subtask or on keyed state). There is no order between the two inputs: a record sees the
broadcast records that reached its subtask before it.

Broadcast state is operator state (``state.operator``): each subtask writes its copy into a
checkpoint, and a restore at any parallelism gives every new subtask a whole copy (new subtask
*i* restores old subtask *i* modulo the old parallelism). The operator's watermark is the minimum
over both inputs, idle inputs left out: a broadcast input without watermarks holds event time
back unless it ends or is idle (``WatermarkStrategy.with_idleness``), as in Flink.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from actors.timers import TimerService
from runtime.api.functions import (
    Collector,
    KeyedProcessContext,
    NonKeyedTimerService,
    ProcessContext,
    RichFunction,
    _SideOutputContext,
)
from runtime.api.operators import KeyedProcessOperator, ProcessOperator
from state.keyed import MapStateDescriptor, StateDescriptor
from state.operator import BroadcastState, ReadOnlyBroadcastState

if TYPE_CHECKING:
    from runtime.api.streams import DataStream, Job, Transformation

KEY = TypeVar("KEY")
IN1 = TypeVar("IN1")
IN2 = TypeVar("IN2")
OUT = TypeVar("OUT")
S = TypeVar("S")
"""The broadcast state a context hands out: read-write or a read-only view."""


class _BroadcastStates(Generic[S]):
    """The broadcast states of one operator subtask by name, as one side of its function sees
    them (read-write on the broadcast side, read-only views on the other)."""

    __slots__ = ("_operator", "_states")

    def __init__(self, operator: str, states: dict[str, S]) -> None:
        self._operator = operator
        self._states: dict[str, S] = states

    def get(self, descriptor: MapStateDescriptor[Any, Any]) -> S:
        if not isinstance(descriptor, MapStateDescriptor):
            msg = (
                f"operator {self._operator}: get_broadcast_state() needs the MapStateDescriptor "
                f"given to broadcast(), got {type(descriptor).__name__}"
            )
            raise TypeError(msg)
        name = descriptor.name
        state = self._states.get(name)
        if state is None:
            declared = ", ".join(repr(n) for n in self._states) or "none"
            msg = (
                f"operator {self._operator}: no broadcast state {name!r}: pass its descriptor to "
                f"broadcast(...) of the broadcast stream (declared there: {declared})"
            )
            raise ValueError(msg)
        return state


class _BroadcastStateAccess(Generic[S]):
    """``get_broadcast_state`` of the contexts of broadcast process functions."""

    __slots__ = ()
    _broadcast: _BroadcastStates[S]

    def get_broadcast_state(self, descriptor: MapStateDescriptor[Any, Any]) -> S:
        """The broadcast state of ``descriptor`` (one of those given to ``broadcast()``): a
        read-only view, whose writes raise, except in ``process_broadcast_element``."""
        return self._broadcast.get(descriptor)


class _NonKeyedBroadcastContext(_BroadcastStateAccess[S], ProcessContext):
    __slots__ = ("_broadcast",)

    def __init__(self, time_service: NonKeyedTimerService, states: _BroadcastStates[S]) -> None:
        super().__init__(time_service)
        self._broadcast = states


class BroadcastReadOnlyContext(_NonKeyedBroadcastContext[ReadOnlyBroadcastState]):
    """The context of :meth:`BroadcastProcessFunction.process_element`: a
    :class:`~runtime.api.functions.ProcessContext` (timestamp, side outputs, processing time and
    watermark) and a read-only view of the broadcast state."""

    __slots__ = ()


class BroadcastContext(_NonKeyedBroadcastContext[BroadcastState]):
    """The context of ``process_broadcast_element`` of a non-keyed
    :class:`BroadcastProcessFunction`: the broadcast state to read and write, the record's
    timestamp, side outputs, processing time and the watermark."""

    __slots__ = ()


class KeyedBroadcastReadOnlyContext(
    _BroadcastStateAccess[ReadOnlyBroadcastState], KeyedProcessContext[KEY]
):
    """The context of :meth:`KeyedBroadcastProcessFunction.process_element` and ``on_timer``: a
    :class:`~runtime.api.functions.KeyedProcessContext` (current key, timers, timestamp, side
    outputs) and a read-only view of the broadcast state."""

    __slots__ = ("_broadcast",)

    def __init__(
        self, timers: TimerService, states: _BroadcastStates[ReadOnlyBroadcastState]
    ) -> None:
        super().__init__(timers)
        self._broadcast = states


class KeyedBroadcastContext(_BroadcastStateAccess[BroadcastState], _SideOutputContext):
    """The context of :meth:`KeyedBroadcastProcessFunction.process_broadcast_element`: the
    broadcast state to read and write, the keyed state of every key of this subtask through
    :meth:`apply_to_keyed_state`, the record's timestamp, side outputs, processing time and the
    watermark. A broadcast record has no key: no current key, no timers."""

    __slots__ = ("_apply", "_broadcast", "_timers")

    def __init__(
        self,
        timers: TimerService,
        states: _BroadcastStates[BroadcastState],
        apply: Callable[[StateDescriptor, Callable[[Any, Any], None]], None],
    ) -> None:
        super().__init__()
        self._timers = timers
        self._broadcast = states
        self._apply = apply

    def apply_to_keyed_state(
        self, descriptor: StateDescriptor, function: Callable[[Any, Any], None]
    ) -> None:
        """Call ``function(key, state)`` for every key of this subtask that has an entry in the
        keyed state of ``descriptor``, with ``state`` (the state object of that descriptor) set to
        the key: read, update or clear it there (Flink's ``applyToKeyedState``)."""
        self._apply(descriptor, function)

    def current_watermark(self) -> int:
        return self._timers.current_watermark

    def current_processing_time(self) -> int:
        return self._timers.current_processing_time()


class BroadcastProcessFunction(RichFunction, Generic[IN1, IN2, OUT]):
    """Processes a non-keyed stream (``process_element``, read-only broadcast state) connected
    with a broadcast stream (``process_broadcast_element`` of each broadcast record in every
    subtask: may change the broadcast state). Side outputs through ``ctx.output(tag, value)`` on both sides."""

    def process_element(
        self, value: IN1, ctx: BroadcastReadOnlyContext, out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def process_broadcast_element(
        self, value: IN2, ctx: BroadcastContext, out: Collector[OUT]
    ) -> None:
        raise NotImplementedError


class KeyedBroadcastProcessFunction(RichFunction, Generic[KEY, IN1, IN2, OUT]):
    """Processes a keyed stream connected with a broadcast stream: ``process_element`` per keyed
    record (keyed state, timers, read-only broadcast state), ``process_broadcast_element`` per
    broadcast record in every subtask (read-write broadcast state, every key's state through
    ``ctx.apply_to_keyed_state``), ``on_timer`` for the key's timers (read-only broadcast state).
    """

    def process_element(
        self, value: IN1, ctx: KeyedBroadcastReadOnlyContext[KEY], out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def process_broadcast_element(
        self, value: IN2, ctx: KeyedBroadcastContext, out: Collector[OUT]
    ) -> None:
        raise NotImplementedError

    def on_timer(
        self, timestamp: int, ctx: KeyedBroadcastReadOnlyContext[KEY], out: Collector[OUT]
    ) -> None:
        """A timer registered for ``ctx.current_key`` fired."""


def _declare_states(
    operator: KeyedProcessOperator | ProcessOperator,
    descriptors: tuple[MapStateDescriptor[Any, Any], ...],
) -> tuple[_BroadcastStates[BroadcastState], _BroadcastStates[ReadOnlyBroadcastState]]:
    """The operator's broadcast states (restored ones with their entries): read-write for the
    broadcast side, read-only views for the other."""
    ctx = operator.context
    where = f"operator {ctx.subtask_label}"
    states = {
        d.name: operator.operator_state.get_broadcast_state(d.name, d.serializer)
        for d in descriptors
    }
    views = {name: state.read_only(where) for name, state in states.items()}
    return _BroadcastStates(ctx.subtask_label, states), _BroadcastStates(ctx.subtask_label, views)


class BroadcastProcessOperator(ProcessOperator):
    """Runs a :class:`BroadcastProcessFunction`: input 1 the non-keyed stream, input 2 the
    broadcast stream."""

    def __init__(
        self,
        name: str,
        uid: str,
        function: Any,
        descriptors: tuple[MapStateDescriptor[Any, Any], ...],
    ) -> None:
        super().__init__(name, uid, function)
        self.descriptors = descriptors

    async def open(self) -> None:
        writable, read_only = _declare_states(self, self.descriptors)
        self._time = NonKeyedTimerService(self.context.operator_name, self.context.clock)
        self._ctx = BroadcastReadOnlyContext(self._time, read_only)
        self._broadcast_ctx = BroadcastContext(self._time, writable)
        self._out = Collector()
        # The base opens the function after the contexts exist (its open() may read state).
        await super(ProcessOperator, self).open()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fn = self.function
        if input_index == 0:
            await self._process_unkeyed(values, timestamps, fn.process_element, self._ctx)
        else:
            await self._process_unkeyed(
                values, timestamps, fn.process_broadcast_element, self._broadcast_ctx
            )


class KeyedBroadcastProcessOperator(KeyedProcessOperator):
    """Runs a :class:`KeyedBroadcastProcessFunction`: input 1 the keyed stream, input 2 the
    broadcast stream."""

    def __init__(
        self,
        name: str,
        uid: str,
        function: Any,
        key_selector: Callable[[Any], Any],
        descriptors: tuple[MapStateDescriptor[Any, Any], ...],
    ) -> None:
        super().__init__(name, uid, function, key_selector)
        self.descriptors = descriptors

    async def open(self) -> None:
        assert self.timers is not None
        writable, read_only = _declare_states(self, self.descriptors)
        self._ctx = KeyedBroadcastReadOnlyContext(self.timers, read_only)
        self._broadcast_ctx = KeyedBroadcastContext(
            self.timers, writable, self._apply_to_keyed_state
        )
        self._out = Collector()
        self._no_key = _NoKeyOfBroadcastRecords(self.context.subtask_label)
        await super(KeyedProcessOperator, self).open()

    async def process_batch(
        self, values: list[Any], timestamps: list[int] | None, input_index: int = 0
    ) -> None:
        fn = self.function
        if input_index == 0:
            assert self.key_selector is not None
            await self._process_elements(values, timestamps, self.key_selector, fn.process_element)
            return
        assert self.keyed_backend is not None
        # A broadcast record has no key: keyed state is reachable through apply_to_keyed_state.
        self.keyed_backend.current_key = self._no_key
        await self._process_unkeyed(
            values, timestamps, fn.process_broadcast_element, self._broadcast_ctx
        )

    def _apply_to_keyed_state(
        self, descriptor: StateDescriptor, function: Callable[[Any, Any], None]
    ) -> None:
        backend = self.keyed_backend
        assert backend is not None
        state = backend.get_state(descriptor)
        previous = backend.current_key
        try:
            for key in list(backend.keys(descriptor.name)):
                backend.current_key = key
                function(key, state)
        finally:
            backend.current_key = previous


class _NoKeyOfBroadcastRecords:
    """The current key of the keyed state backend while a broadcast record is processed: keyed
    state used then (a state object kept from ``open()``) raises at its lookup of the key,
    instead of reading or writing the entry of a made-up key."""

    __slots__ = ("_operator",)

    def __init__(self, operator: str) -> None:
        self._operator = operator

    def __hash__(self) -> int:
        msg = (
            f"operator {self._operator}: keyed state has no current key in "
            "process_broadcast_element() (a broadcast record has no key); reach the state of "
            "every key there with ctx.apply_to_keyed_state(descriptor, function)"
        )
        raise RuntimeError(msg)

    def __repr__(self) -> str:
        return "<no key: a broadcast record>"


class BroadcastStream:
    """A stream sent whole to every subtask of the operator it is connected to, with the
    broadcast states that operator keeps (``stream.broadcast(descriptor, ...)``). Connect it:
    ``stream.connect(broadcast_stream)`` or ``keyed.connect(broadcast_stream)``."""

    def __init__(
        self,
        job: Job,
        transformation: Transformation,
        descriptors: tuple[MapStateDescriptor[Any, Any], ...],
    ) -> None:
        self.job = job
        self.transformation = transformation
        self.descriptors = descriptors


class BroadcastConnectedStream:
    """A stream (keyed or not) connected with a :class:`BroadcastStream`; ``process()`` it with a
    :class:`KeyedBroadcastProcessFunction` (keyed) or a :class:`BroadcastProcessFunction`."""

    def __init__(self, first: DataStream, broadcast: BroadcastStream) -> None:
        self.first = first
        self.broadcast = broadcast

    def process(
        self,
        fn: KeyedBroadcastProcessFunction[Any, Any, Any, Any]
        | BroadcastProcessFunction[Any, Any, Any],
        name: str | None = None,
    ) -> DataStream:
        """Run ``fn`` on both inputs: the connected stream is input 1, the broadcast one input 2."""
        from runtime.api.streams import (
            DataStream,
            JobDefinitionError,
            KeyedStream,
            _function_name,
            _require_sync,
        )

        first = self.first
        descriptors = self.broadcast.descriptors
        keyed = isinstance(first, KeyedStream)
        if keyed and not isinstance(fn, KeyedBroadcastProcessFunction):
            msg = (
                "process() of a keyed stream connected with a broadcast stream needs a "
                f"KeyedBroadcastProcessFunction, got {type(fn).__name__}"
            )
            raise JobDefinitionError(msg)
        if not keyed and not isinstance(fn, BroadcastProcessFunction):
            hint = (
                ": call key_by() before connect() for a KeyedBroadcastProcessFunction"
                if isinstance(fn, KeyedBroadcastProcessFunction)
                else ""
            )
            msg = (
                "process() of a stream connected with a broadcast stream needs a "
                f"BroadcastProcessFunction, got {type(fn).__name__}{hint}"
            )
            raise JobDefinitionError(msg)
        _require_sync("process()", fn)
        default = "KeyedBroadcastProcess" if keyed else "BroadcastProcess"
        fn_name = _function_name(fn)
        label = name or (f"{default}({fn_name})" if fn_name else default)
        key_selector = first.key_selector if isinstance(first, KeyedStream) else None

        def factory(op_name: str, uid: str) -> Any:
            if key_selector is not None:
                return KeyedBroadcastProcessOperator(op_name, uid, fn, key_selector, descriptors)
            return BroadcastProcessOperator(op_name, uid, fn, descriptors)

        job = first.job
        t = job._add(
            "operator",
            label,
            [first.transformation, self.broadcast.transformation],
            operator_factory=factory,
            key_selector=key_selector,
            two_input=True,
            broadcast_state=tuple(d.name for d in descriptors),
        )
        return DataStream(job, t)
