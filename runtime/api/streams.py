"""The job API: a job file defines ``build(job)`` and describes its dataflow on ``job``.

Example::

    def build(job):
        lines = job.from_source(FileSource(job.params.get("input", "words.txt")))
        counts = (lines.flat_map(str.split).name("split")
                       .key_by(lambda w: w)
                       .map(lambda w: (w, 1))
                       ...)

Each method returns a new :class:`DataStream`; ``name``, ``uid``, ``set_parallelism`` and
``disable_chaining`` configure the operator that produced the stream they are called on.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

from actors.partitioner import (
    BroadcastPartitioner,
    ForwardPartitioner,
    Partitioner,
    RebalancePartitioner,
)
from runtime.api.aggregations import Field, FieldAggregation, check_field, operator_label
from runtime.api.functions import (
    ASYNC_ALTERNATIVE,
    AggregateFunction,
    KeyedCoProcessFunction,
    KeyedProcessFunction,
    OutputTag,
    ProcessFunction,
    find_async_callable,
)
from runtime.api.sinks import PrintSink, Sink
from runtime.api.sources import Source
from runtime.api.watermarks import WatermarkStrategy
from runtime.config import DEFAULT_PARALLELISM
from state.keyed import MapStateDescriptor
from state.keygroups import DEFAULT_MAX_PARALLELISM, UPPER_BOUND_MAX_PARALLELISM

if TYPE_CHECKING:
    from runtime.api.async_io import AsyncRetryStrategy
    from runtime.api.broadcast import BroadcastConnectedStream, BroadcastStream
    from runtime.api.connected import CoFlatMapFunction, CoMapFunction, CoProcessFunction
    from runtime.api.joins import CoGroupedStreams, IntervalJoin
    from runtime.api.windows import AllWindowedStream, WindowAssigner, WindowedStream

VIRTUAL_KINDS = ("partition", "union", "side_output")
"""Transformations that are properties of edges, not operators."""


class JobDefinitionError(ValueError):
    """The job's dataflow is invalid (names the operator and what to change)."""


class JobParameters(dict[str, str]):
    """Job parameters from ``--set key=value``, with typed getters."""

    def get_int(self, key: str, default: int) -> int:
        return int(self[key]) if key in self else default

    def get_float(self, key: str, default: float) -> float:
        return float(self[key]) if key in self else default

    def get_bool(self, key: str, default: bool) -> bool:
        if key not in self:
            return default
        value = self[key].strip().lower()
        if value in {"1", "true", "yes", "on"}:
            return True
        if value in {"0", "false", "no", "off"}:
            return False
        msg = f"job parameter {key}={self[key]!r} is not a boolean (use true or false)"
        raise JobDefinitionError(msg)

    def require(self, key: str) -> str:
        if key not in self:
            msg = f"job parameter {key!r} is required: pass --set {key}=..."
            raise JobDefinitionError(msg)
        return self[key]


@dataclass(eq=False)
class Transformation:
    """One node of the logical dataflow (Flink's ``Transformation``)."""

    id: int
    kind: str
    """``source``, ``operator``, ``sink``, or the virtual ``partition``, ``union`` and
    ``side_output``."""
    name: str
    inputs: list[Transformation] = field(default_factory=list)
    operator_factory: Callable[[str, str], Any] | None = None
    """Called with (name, uid) once per subtask to create the operator."""
    source: Source[Any] | None = None
    watermark_strategy: WatermarkStrategy | None = None
    """Of ``source`` nodes: given to ``from_source`` (else the source's own, if any)."""
    partitioner_factory: Callable[[], Partitioner] | None = None
    """Of ``partition`` nodes other than ``key_by`` (whose partitioner the job graph makes)."""
    key_selector: Callable[[Any], Any] | None = None
    """Set on ``key_by`` partition nodes and on the operators that consume a keyed stream (they
    get a keyed state backend)."""
    parallelism: int | None = None
    max_parallelism: int | None = None
    uid: str | None = None
    chaining: bool = True
    two_input: bool = False
    """Inputs are two logical inputs (input 1, input 2), not a union."""
    side_output_tag: str | None = None
    """Of ``side_output`` nodes: the tag of their input operator's side output they read."""
    broadcast_state: tuple[str, ...] = ()
    """Of operators with a broadcast input: the names of the broadcast states they keep."""

    def __repr__(self) -> str:
        return f"<{self.kind} {self.name!r}>"


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "operator"


def _function_name(fn: Any) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "" if name == "<lambda>" else name


def _require_sync(method: str, fn: Any) -> None:
    """Refuse a user function the runtime would call without awaiting (it would emit coroutines)."""
    problem = find_async_callable(fn)
    if problem is not None:
        msg = f"{method}: {problem}; {ASYNC_ALTERNATIVE}"
        raise JobDefinitionError(msg)


class Job:
    """The dataflow being built; handed to ``build(job)`` by the runner."""

    def __init__(
        self,
        params: dict[str, str] | None = None,
        parallelism: int = DEFAULT_PARALLELISM,
        max_parallelism: int = DEFAULT_MAX_PARALLELISM,
        name: str = "job",
    ) -> None:
        self.params = JobParameters(params or {})
        self.parallelism = parallelism
        self.max_parallelism = max_parallelism
        self.name = name
        self.transformations: list[Transformation] = []
        self._ids = itertools.count(1)

    def _add(self, kind: str, name: str, inputs: list[Transformation], **kw: Any) -> Transformation:
        t = Transformation(next(self._ids), kind, name, inputs, **kw)
        self.transformations.append(t)
        return t

    def from_source(
        self,
        source: Source[Any],
        name: str | None = None,
        watermark_strategy: WatermarkStrategy | None = None,
    ) -> DataStream:
        """A stream read from ``source`` (see ``connectors/`` for files, collections, Kafka).

        ``watermark_strategy`` (as Flink's ``env.fromSource``): event time and watermarks right
        in the source, per split when its reader tells splits apart (Kafka partitions), so that
        an idle split or a subtask without splits does not hold event time back."""
        if not isinstance(source, Source):
            msg = f"from_source() needs a runtime.Source, got {type(source).__name__}"
            raise JobDefinitionError(msg)
        if watermark_strategy is not None and not isinstance(watermark_strategy, WatermarkStrategy):
            msg = (
                "from_source(watermark_strategy=...) needs a runtime.WatermarkStrategy, got "
                f"{type(watermark_strategy).__name__}"
            )
            raise JobDefinitionError(msg)
        t = self._add(
            "source",
            name or f"Source: {source.name()}",
            [],
            source=source,
            watermark_strategy=watermark_strategy,
        )
        return DataStream(self, t)

    def sinks(self) -> list[Transformation]:
        return [t for t in self.transformations if t.kind == "sink"]


class DataStream:
    """A stream of records produced by one transformation."""

    def __init__(self, job: Job, transformation: Transformation) -> None:
        self.job = job
        self.transformation = transformation

    # ---- configuration of the producing operator

    def name(self, name: str) -> DataStream:
        self.transformation.name = name
        return self

    def uid(self, uid: str) -> DataStream:
        """A stable id for this operator's state in checkpoints and savepoints."""
        if not re.fullmatch(r"[A-Za-z0-9_.:-]+", uid):
            msg = f"uid {uid!r} may only hold letters, digits and _ . : -"
            raise JobDefinitionError(msg)
        self.transformation.uid = uid
        return self

    def set_parallelism(self, parallelism: int) -> DataStream:
        if parallelism < 1:
            msg = f"operator {self.transformation.name!r}: parallelism must be >= 1"
            raise JobDefinitionError(msg)
        self.transformation.parallelism = parallelism
        return self

    def set_max_parallelism(self, max_parallelism: int) -> DataStream:
        """The number of key groups of this operator's keyed state and timers (default: the
        job's). Fixed for the life of the state: a restore with another one is refused."""
        if not 1 <= max_parallelism <= UPPER_BOUND_MAX_PARALLELISM:
            msg = (
                f"operator {self.transformation.name!r}: max parallelism must be in "
                f"1..{UPPER_BOUND_MAX_PARALLELISM}, got {max_parallelism}"
            )
            raise JobDefinitionError(msg)
        self.transformation.max_parallelism = max_parallelism
        return self

    def disable_chaining(self) -> DataStream:
        """Run this operator in its own task, connected to its neighbours by channels."""
        self.transformation.chaining = False
        return self

    # ---- transformations

    def _operator(
        self,
        op_class: type,
        default_name: str,
        function: Any,
        name: str | None,
        key_selector: Callable[[Any], Any] | None = None,
    ) -> DataStream:
        fn_name = _function_name(function)
        label = name or (f"{default_name}({fn_name})" if fn_name else default_name)

        def factory(op_name: str, uid: str) -> Any:
            return op_class(op_name, uid, function, key_selector)

        t = self.job._add(
            "operator",
            label,
            [self.transformation],
            operator_factory=factory,
            key_selector=key_selector,
        )
        return DataStream(self.job, t)

    def map(self, fn: Callable[[Any], Any], name: str | None = None) -> DataStream:
        from runtime.api.operators import MapOperator

        _require_sync("map()", fn)
        return self._operator(MapOperator, "Map", fn, name, self._key_selector())

    def map_async(
        self,
        fn: Any,
        capacity: int = 100,
        timeout: int | str = "5s",
        ordered: bool = True,
        retry: AsyncRetryStrategy | None = None,
        name: str | None = None,
    ) -> DataStream:
        """Async I/O: ``await fn(value)`` per record (an ``async def`` or an
        :class:`AsyncFunction`), at most ``capacity`` requests pending per subtask (then the
        operator takes no more input: backpressure). ``ordered``: results in input order; else
        as they complete, but never past a later watermark. ``timeout`` (ms or ``"5s"``; 0 for
        none) covers all attempts and calls the function's ``timeout(value)`` hook (default: the
        task fails); ``retry`` an :class:`AsyncRetryStrategy`. Pending requests are checkpointed
        and re-issued on restore. On a keyed stream ``fn`` may use keyed state before and after
        its awaits. See ``runtime/api/async_io.py``."""
        return self._async_operator(
            "map_async()", "AsyncMap", fn, capacity, timeout, ordered, retry, name, flat=False
        )

    def flat_map_async(
        self,
        fn: Any,
        capacity: int = 100,
        timeout: int | str = "5s",
        ordered: bool = True,
        retry: AsyncRetryStrategy | None = None,
        name: str | None = None,
    ) -> DataStream:
        """:meth:`map_async` whose requests return an iterable of results (none, one or more)."""
        return self._async_operator(
            "flat_map_async()",
            "AsyncFlatMap",
            fn,
            capacity,
            timeout,
            ordered,
            retry,
            name,
            flat=True,
        )

    def _async_operator(
        self,
        method: str,
        default_name: str,
        fn: Any,
        capacity: int,
        timeout: int | str,
        ordered: bool,
        retry: AsyncRetryStrategy | None,
        name: str | None,
        *,
        flat: bool,
    ) -> DataStream:
        from runtime.api.async_io import (
            AsyncRetryStrategy,
            AsyncWaitOperator,
            describe_async_function,
        )
        from runtime.api.durations import duration_ms

        problem = describe_async_function(fn)
        if problem is not None:
            raise JobDefinitionError(f"{method}: {problem}")
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            msg = f"{method}: capacity must be an int >= 1, got {capacity!r}"
            raise JobDefinitionError(msg)
        timeout_ms = duration_ms(timeout, f"{method} timeout")
        if retry is not None and not isinstance(retry, AsyncRetryStrategy):
            msg = f"{method}: retry must be an AsyncRetryStrategy, got {type(retry).__name__}"
            raise JobDefinitionError(msg)
        options = {
            "capacity": capacity,
            "timeout_ms": timeout_ms,
            "ordered": bool(ordered),
            "retry": retry,
            "flat": flat,
        }
        return self._operator(
            functools.partial(AsyncWaitOperator, **options),  # type: ignore[arg-type]
            default_name,
            fn,
            name,
            self._key_selector(),
        )

    def filter(self, fn: Callable[[Any], bool], name: str | None = None) -> DataStream:
        from runtime.api.operators import FilterOperator

        _require_sync("filter()", fn)
        return self._operator(FilterOperator, "Filter", fn, name, self._key_selector())

    def flat_map(self, fn: Callable[[Any], Iterable[Any]], name: str | None = None) -> DataStream:
        from runtime.api.operators import FlatMapOperator

        _require_sync("flat_map()", fn)
        return self._operator(FlatMapOperator, "FlatMap", fn, name, self._key_selector())

    def map_batches(
        self, fn: Callable[[list[Any]], list[Any]], name: str | None = None
    ) -> DataStream:
        """The fast path for vectorised code: ``fn(records)`` once per buffer (up to
        ``--buffer-size`` records, fewer when a buffer is flushed early), returning a list of
        exactly as many results, in order; each result keeps its record's timestamp. Another
        number of results fails the task, naming the operator (use :meth:`flat_map_batches`).
        ``fn`` gets a list of its own; on a keyed stream a batch holds records of many keys
        and ``fn`` has no keyed state. Async functions are refused (use :meth:`map_async`)."""
        from runtime.api.operators import MapBatchesOperator

        _require_sync("map_batches()", fn)
        return self._operator(MapBatchesOperator, "MapBatches", fn, name)

    def flat_map_batches(
        self, fn: Callable[[list[Any]], list[Any]], name: str | None = None
    ) -> DataStream:
        """:meth:`map_batches` whose ``fn`` returns a list of any number of results (an
        aggregate of the batch, say). With event time every result gets the latest timestamp
        of the batch's records: no result is earlier than the input it was made from."""
        from runtime.api.operators import FlatMapBatchesOperator

        _require_sync("flat_map_batches()", fn)
        return self._operator(FlatMapBatchesOperator, "FlatMapBatches", fn, name)

    def assign_timestamps_and_watermarks(
        self,
        strategy: WatermarkStrategy | Callable[[Any], int],
        max_out_of_orderness_ms: int | str = 0,
        name: str | None = None,
    ) -> DataStream:
        """Event time by a :class:`WatermarkStrategy`: timestamps from its assigner, watermarks
        from its generator, emitted after each buffer and every ``--auto-watermark-interval``.

        The older form ``assign_timestamps_and_watermarks(timestamp_fn, max_out_of_orderness_ms)``
        (``timestamp_fn(value)``) is ``WatermarkStrategy.for_bounded_out_of_orderness(bound)``
        with that assigner."""
        from runtime.api.operators import TimestampsAndWatermarksOperator

        if not isinstance(strategy, WatermarkStrategy):
            if not callable(strategy):
                msg = (
                    "assign_timestamps_and_watermarks() needs a WatermarkStrategy (or a "
                    f"timestamp function), got {type(strategy).__name__}"
                )
                raise JobDefinitionError(msg)
            timestamp_fn = strategy
            _require_sync("assign_timestamps_and_watermarks()", timestamp_fn)
            strategy = WatermarkStrategy.for_bounded_out_of_orderness(
                max_out_of_orderness_ms
            ).with_timestamp_assigner(lambda value, _record_ts: timestamp_fn(value))
        elif max_out_of_orderness_ms:
            msg = (
                "assign_timestamps_and_watermarks(): max_out_of_orderness_ms goes with a timestamp "
                "function; a WatermarkStrategy has its own (for_bounded_out_of_orderness)"
            )
            raise JobDefinitionError(msg)
        chosen = strategy

        def factory(op_name: str, uid: str) -> Any:
            return TimestampsAndWatermarksOperator(op_name, uid, chosen)

        t = self.job._add(
            "operator",
            name or "Timestamps/Watermarks",
            [self.transformation],
            operator_factory=factory,
        )
        return DataStream(self.job, t)

    def _key_selector(self) -> Callable[[Any], Any] | None:
        return None

    def key_by(self, key_selector: Callable[[Any], Any]) -> KeyedStream:
        """Partition by key: records with equal keys go to the same subtask and share state.

        The key groups are those of the operator this stream feeds (its max parallelism), so
        the partitioner is made when the job graph is built, not here.
        """
        _require_sync("key_by()", key_selector)
        job = self.job
        t = job._add("partition", "hash", [self.transformation], key_selector=key_selector)
        return KeyedStream(job, t, key_selector)

    def rebalance(self) -> DataStream:
        return self._partition("rebalance", RebalancePartitioner)

    @overload
    def broadcast(self) -> DataStream: ...

    @overload
    def broadcast(self, *descriptors: MapStateDescriptor[Any, Any]) -> BroadcastStream: ...

    def broadcast(self, *descriptors: MapStateDescriptor[Any, Any]) -> DataStream | BroadcastStream:
        """Send every record to every subtask of the next operator. With broadcast state
        descriptors (``MapStateDescriptor``, one per broadcast state): a ``BroadcastStream`` for
        the broadcast state pattern, to ``connect()`` a stream with (see ``runtime.api.broadcast``).
        """
        if not descriptors:
            return self._partition("broadcast", BroadcastPartitioner)
        from runtime.api.broadcast import BroadcastStream

        names: set[str] = set()
        for descriptor in descriptors:
            if not isinstance(descriptor, MapStateDescriptor):
                msg = (
                    "broadcast() takes MapStateDescriptors of the broadcast states, got "
                    f"{type(descriptor).__name__}"
                )
                raise JobDefinitionError(msg)
            if descriptor.ttl is not None:
                msg = (
                    f"broadcast state {descriptor.name!r}: a TTL is not supported on broadcast "
                    "state (every subtask must hold the same entries); remove entries in "
                    "process_broadcast_element() instead"
                )
                raise JobDefinitionError(msg)
            if descriptor.name in names:
                msg = f"broadcast(): two descriptors of broadcast state {descriptor.name!r}"
                raise JobDefinitionError(msg)
            names.add(descriptor.name)
        partition = self._partition("broadcast", BroadcastPartitioner)
        return BroadcastStream(self.job, partition.transformation, tuple(descriptors))

    def forward(self) -> DataStream:
        return self._partition("forward", ForwardPartitioner)

    def _partition(self, name: str, factory: Callable[[], Partitioner]) -> DataStream:
        t = self.job._add("partition", name, [self.transformation], partitioner_factory=factory)
        return DataStream(self.job, t)

    def union(self, *others: DataStream) -> DataStream:
        """All records of this stream and ``others``, in no particular order across them."""
        for other in others:
            if other.job is not self.job:
                msg = "union() of streams from different jobs"
                raise JobDefinitionError(msg)
        t = self.job._add(
            "union", "union", [self.transformation, *(o.transformation for o in others)]
        )
        return DataStream(self.job, t)

    @overload
    def connect(self, other: DataStream) -> ConnectedStreams: ...

    @overload
    def connect(self, other: BroadcastStream) -> BroadcastConnectedStream: ...

    def connect(
        self, other: DataStream | BroadcastStream
    ) -> ConnectedStreams | BroadcastConnectedStream:
        """Two streams processed together by one two-input function: ``map``, ``flat_map`` or
        ``process`` with a co-function (``CoMapFunction``, ``CoFlatMapFunction``,
        ``CoProcessFunction``; ``KeyedCoProcessFunction`` after ``key_by``); with a
        ``BroadcastStream`` (``broadcast(descriptor)``), the broadcast state pattern."""
        from runtime.api.broadcast import BroadcastConnectedStream, BroadcastStream

        if other.job is not self.job:
            msg = "connect() of streams from different jobs"
            raise JobDefinitionError(msg)
        if isinstance(other, BroadcastStream):
            return BroadcastConnectedStream(self, other)
        return ConnectedStreams(self, other)

    def join(self, other: DataStream) -> CoGroupedStreams:
        """A window join: ``a.join(b).where(key_a).equal_to(key_b).window(assigner).apply(fn)``
        joins every pair of records with equal keys in the same window (see
        ``runtime.api.joins``)."""
        from runtime.api.joins import CoGroupedStreams

        return CoGroupedStreams(self, other, "join")

    def co_group(self, other: DataStream) -> CoGroupedStreams:
        """A window co-group: like :meth:`join`, but ``apply(fn(firsts, seconds, out))`` gets
        all of a key's records of a window from both inputs at once."""
        from runtime.api.joins import CoGroupedStreams

        return CoGroupedStreams(self, other, "co_group")

    def window_all(self, assigner: WindowAssigner) -> AllWindowedStream:
        """Group the whole (non-keyed) stream into windows of ``assigner``, evaluated by one
        subtask (parallelism 1): an ``AllWindowedStream``."""
        from runtime.api.windows import AllWindowedStream

        return AllWindowedStream(self, assigner)

    def process(
        self,
        fn: ProcessFunction[Any, Any] | KeyedProcessFunction[Any, Any, Any],
        name: str | None = None,
    ) -> DataStream:
        """Run a :class:`ProcessFunction` on each record: a collector, side outputs
        (``ctx.output(tag, value)``), processing time and the watermark; no keyed state or
        timers (``key_by()`` first and a :class:`KeyedProcessFunction` for those)."""
        from runtime.api.operators import ProcessOperator

        if isinstance(fn, KeyedProcessFunction):
            msg = (
                f"process() with a KeyedProcessFunction ({type(fn).__name__}) needs a keyed "
                "stream: call key_by() first, or use a ProcessFunction"
            )
            raise JobDefinitionError(msg)
        if not isinstance(fn, ProcessFunction):
            msg = f"process() needs a ProcessFunction, got {type(fn).__name__}"
            raise JobDefinitionError(msg)
        _require_sync("process()", fn)
        return self._operator(ProcessOperator, "Process", fn, name)

    def get_side_output(self, tag: OutputTag) -> DataStream:
        """The records the operator that produced this stream emitted to the side output ``tag``
        (for instance a window's late records); empty if it emits none."""
        if not isinstance(tag, OutputTag):
            msg = f"get_side_output() needs an OutputTag, got {type(tag).__name__}"
            raise JobDefinitionError(msg)
        producer = self.transformation
        if producer.kind in ("partition", "union", "side_output", "sink"):
            what = {"partition": "a partitioned stream (key_by, rebalance, ...)"}.get(
                producer.kind, f"a {producer.kind.replace('_', ' ')}"
            )
            msg = (
                f"get_side_output({tag.name!r}) on {what}: call it on the stream that the "
                "operator emitting the side output returned"
            )
            raise JobDefinitionError(msg)
        t = self.job._add(
            "side_output", f"side output {tag.name}", [producer], side_output_tag=tag.name
        )
        return DataStream(self.job, t)

    def sink_to(self, sink: Sink, name: str | None = None) -> DataStream:
        if not isinstance(sink, Sink):
            msg = f"sink_to() needs a runtime.Sink, got {type(sink).__name__}"
            raise JobDefinitionError(msg)

        def factory(op_name: str, uid: str) -> Any:
            return sink.create_operator(op_name, uid)

        t = self.job._add(
            "sink", name or f"Sink: {sink.name()}", [self.transformation], operator_factory=factory
        )
        return DataStream(self.job, t)

    def print(self, prefix: str = "") -> DataStream:
        """Print every record (``str()`` of it) to stdout."""
        return self.sink_to(PrintSink(prefix), name="Sink: Print")


class KeyedStream(DataStream):
    """A stream partitioned by key; operators on it get keyed state and timers."""

    def __init__(
        self, job: Job, transformation: Transformation, key_selector: Callable[[Any], Any]
    ) -> None:
        super().__init__(job, transformation)
        self.key_selector = key_selector

    def _key_selector(self) -> Callable[[Any], Any] | None:
        return self.key_selector

    def reduce(self, fn: Callable[[Any, Any], Any], name: str | None = None) -> DataStream:
        """The running reduction per key, emitted after every record."""
        from runtime.api.operators import KeyedReduceOperator

        _require_sync("reduce()", fn)
        return self._operator(KeyedReduceOperator, "Reduce", fn, name, self.key_selector)

    def interval_join(self, other: KeyedStream) -> IntervalJoin:
        """An interval join on event time with another keyed stream:
        ``left.interval_join(right).between(lower, upper).process(ProcessJoinFunction)``."""
        from runtime.api.joins import IntervalJoin

        if not isinstance(other, KeyedStream):
            msg = (
                "interval_join() needs a keyed stream to join with: call key_by() on it, got "
                f"{type(other).__name__}"
            )
            raise JobDefinitionError(msg)
        if other.job is not self.job:
            msg = "interval_join() of streams from different jobs"
            raise JobDefinitionError(msg)
        return IntervalJoin(self, other)

    def window(self, assigner: WindowAssigner) -> WindowedStream:
        """Group each key's records into the windows of ``assigner`` (``runtime.windows``):
        a ``WindowedStream``, finished by ``reduce``, ``aggregate`` or ``process``."""
        from runtime.api.windows import WindowedStream

        return WindowedStream(self, assigner)

    def process(
        self,
        fn: ProcessFunction[Any, Any] | KeyedProcessFunction[Any, Any, Any],
        name: str | None = None,
    ) -> DataStream:
        """Run a :class:`KeyedProcessFunction` with keyed state, timers and a collector."""
        from runtime.api.operators import KeyedProcessOperator

        if not isinstance(fn, KeyedProcessFunction):
            msg = (
                f"process() on a keyed stream needs a KeyedProcessFunction, got {type(fn).__name__}"
            )
            raise JobDefinitionError(msg)
        _require_sync("process()", fn)
        return self._operator(KeyedProcessOperator, "KeyedProcess", fn, name, self.key_selector)

    def aggregate(
        self, fn: AggregateFunction[Any, Any, Any], name: str | None = None
    ) -> DataStream:
        """The rolling aggregation per key: each record is added to its key's accumulator (keyed
        state, created by ``fn.create_accumulator()``) and ``fn.get_result(accumulator)`` is
        emitted after every record, as Flink's ``KeyedStream.aggregate`` outside windows."""
        from runtime.api.operators import KeyedAggregateOperator

        if not isinstance(fn, AggregateFunction):
            msg = f"aggregate() needs an AggregateFunction, got {type(fn).__name__}"
            raise JobDefinitionError(msg)
        _require_sync("aggregate()", fn)
        return self._operator(KeyedAggregateOperator, "Aggregate", fn, name, self.key_selector)

    def sum(self, field: Field, name: str | None = None) -> DataStream:
        """The running sum of ``field`` per key, emitted after every record: the key's first
        record with ``field`` replaced by the sum. ``field`` is a dict key, a tuple index or
        an attribute name."""
        return self._field_aggregation("sum", field, name)

    def min(self, field: Field, name: str | None = None) -> DataStream:
        """The running minimum of ``field`` per key: the key's first record with only ``field``
        updated (use :meth:`min_by` for the whole record holding the minimum)."""
        return self._field_aggregation("min", field, name)

    def max(self, field: Field, name: str | None = None) -> DataStream:
        """The running maximum of ``field`` per key: the key's first record with only ``field``
        updated (use :meth:`max_by` for the whole record holding the maximum)."""
        return self._field_aggregation("max", field, name)

    def min_by(self, field: Field, name: str | None = None) -> DataStream:
        """Per key, the whole record with the smallest ``field`` so far (the first one on ties),
        emitted after every record."""
        return self._field_aggregation("min_by", field, name)

    def max_by(self, field: Field, name: str | None = None) -> DataStream:
        """Per key, the whole record with the largest ``field`` so far (the first one on ties),
        emitted after every record."""
        return self._field_aggregation("max_by", field, name)

    def _field_aggregation(self, kind: str, field: Field, name: str | None) -> DataStream:
        from runtime.api.operators import KeyedReduceOperator

        try:
            check_field(f"{kind}()", field)
        except TypeError as exc:
            raise JobDefinitionError(str(exc)) from None
        return self._operator(
            KeyedReduceOperator,
            operator_label(kind, field),
            FieldAggregation(kind, field),
            name or operator_label(kind, field),
            self.key_selector,
        )


def default_uids(job: Job) -> dict[int, str]:
    """Stable operator ids: the user's ``uid()``, else the slug of the name, numbered if repeated.

    Deterministic for the same job file, so checkpoints match without explicit uids as long as
    operator names and order stay the same. Set ``uid()`` on stateful operators to rename freely.
    """
    taken = {t.uid for t in job.transformations if t.uid}
    counts: dict[str, int] = {}
    result: dict[int, str] = {}
    for t in job.transformations:
        if t.kind in VIRTUAL_KINDS:
            continue
        if t.uid:
            result[t.id] = t.uid
            continue
        base = _slug(t.name)
        n = counts.get(base, 0) + 1
        counts[base] = n
        uid = base if n == 1 else f"{base}-{n}"
        while uid in taken:
            n += 1
            counts[base] = n
            uid = f"{base}-{n}"
        taken.add(uid)
        result[t.id] = uid
    return result


class ConnectedStreams:
    """Two streams to be processed by one two-input operator: ``map``, ``flat_map`` and
    ``process`` with a co-function, input 1 the stream ``connect()`` was called on. After
    ``key_by(first_key, second_key)`` ``process`` takes a ``KeyedCoProcessFunction`` (keyed
    state and timers shared by both inputs)."""

    def __init__(self, first: DataStream, second: DataStream) -> None:
        self.first = first
        self.second = second

    def key_by(
        self, first_key: Callable[[Any], Any], second_key: Callable[[Any], Any]
    ) -> ConnectedStreams:
        """Partition both streams by key so that equal keys meet in the same subtask and state."""
        _require_sync("key_by() (first key)", first_key)
        _require_sync("key_by() (second key)", second_key)
        return ConnectedStreams(self.first.key_by(first_key), self.second.key_by(second_key))

    def _two_input(
        self,
        label: str,
        factory: Callable[[str, str], Any],
        key_selector: Callable[[Any], Any] | None = None,
    ) -> DataStream:
        job = self.first.job
        t = job._add(
            "operator",
            label,
            [self.first.transformation, self.second.transformation],
            operator_factory=factory,
            key_selector=key_selector,
            two_input=True,
        )
        return DataStream(job, t)

    def map(self, fn: CoMapFunction[Any, Any, Any], name: str | None = None) -> DataStream:
        """``fn.map1`` on each record of input 1, ``fn.map2`` on each of input 2."""
        from runtime.api.connected import CoMapFunction, CoMapOperator

        return self._co_function("map", CoMapFunction, CoMapOperator, "CoMap", fn, name)

    def flat_map(self, fn: CoFlatMapFunction[Any, Any, Any], name: str | None = None) -> DataStream:
        """``fn.flat_map1`` on each record of input 1, ``fn.flat_map2`` on each of input 2,
        each returning an iterable of results."""
        from runtime.api.connected import CoFlatMapFunction, CoFlatMapOperator

        return self._co_function(
            "flat_map", CoFlatMapFunction, CoFlatMapOperator, "CoFlatMap", fn, name
        )

    def _co_function(
        self,
        method: str,
        function_class: type,
        operator_class: type,
        default_name: str,
        fn: Any,
        name: str | None,
    ) -> DataStream:
        if not isinstance(fn, function_class):
            msg = (
                f"{method}() on connected streams needs a {function_class.__name__}, got "
                f"{type(fn).__name__}"
            )
            raise JobDefinitionError(msg)
        _require_sync(f"{method}()", fn)
        fn_name = _function_name(fn)
        label = name or (f"{default_name}({fn_name})" if fn_name else default_name)

        def factory(op_name: str, uid: str) -> Any:
            return operator_class(op_name, uid, fn)

        return self._two_input(label, factory)

    def process(
        self,
        fn: KeyedCoProcessFunction[Any, Any, Any] | CoProcessFunction[Any, Any, Any],
        name: str | None = None,
    ) -> DataStream:
        """A ``CoProcessFunction`` (no keyed state, no timers), or after ``key_by`` a
        ``KeyedCoProcessFunction``."""
        from runtime.api.connected import CoProcessFunction, CoProcessOperator
        from runtime.api.operators import KeyedCoProcessOperator

        if isinstance(fn, CoProcessFunction):
            return self._co_function(
                "process", CoProcessFunction, CoProcessOperator, "CoProcess", fn, name
            )
        first, second = self.first, self.second
        if not isinstance(fn, KeyedCoProcessFunction):
            msg = (
                "process() on connected streams needs a CoProcessFunction (or, after key_by, a "
                f"KeyedCoProcessFunction), got {type(fn).__name__}"
            )
            raise JobDefinitionError(msg)
        if not (isinstance(first, KeyedStream) and isinstance(second, KeyedStream)):
            msg = (
                "process() with a KeyedCoProcessFunction needs key_by(first_key, second_key) "
                "first (or a CoProcessFunction, which has no keyed state)"
            )
            raise JobDefinitionError(msg)
        _require_sync("process()", fn)
        keys = (first.key_selector, second.key_selector)
        fn_name = _function_name(fn)
        label = name or (f"KeyedCoProcess({fn_name})" if fn_name else "KeyedCoProcess")

        def factory(op_name: str, uid: str) -> Any:
            return KeyedCoProcessOperator(op_name, uid, fn, keys[0], keys[1])

        return self._two_input(label, factory, keys[0])


def keyed_two_input(
    first: KeyedStream, second: KeyedStream, label: str, factory: Callable[[str, str], Any]
) -> DataStream:
    """The stream of a two-input operator (``factory``) on two keyed streams: input 1 is
    ``first``, input 2 ``second``; both are partitioned by the operator's key groups."""
    return ConnectedStreams(first, second)._two_input(label, factory, first.key_selector)
