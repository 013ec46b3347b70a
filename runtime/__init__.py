"""A stream-processing runtime for Python on asyncio (the public API).

Write a job file with ``build(job)`` and run it with ``python -m runtime run job.py``, or run a
build function from Python with :func:`run_job`.
"""

# First: refuses (one clear line) a module of the user's that would shadow the runtime's packages.
import runtime.plan.shadowing  # noqa: F401
from actors.operator import NewerOutputPolicy
from runtime.api.async_io import AsyncFunction, AsyncRetryStrategy, AsyncTimeoutError
from runtime.api.functions import (
    AggregateFunction,
    Collector,
    FilterFunction,
    FlatMapFunction,
    KeyedCoProcessFunction,
    KeyedProcessContext,
    KeyedProcessFunction,
    MapFunction,
    OutputTag,
    ProcessContext,
    ProcessFunction,
    ReduceFunction,
    RichFunction,
    RuntimeContext,
)
from runtime.api.sinks import PrintSink, Sink, SinkWriter
from runtime.api.sources import Source, SourceReader
from runtime.api.streams import (
    ConnectedStreams,
    DataStream,
    Job,
    JobDefinitionError,
    JobParameters,
    KeyedStream,
)
from runtime.api.watermarks import (
    BoundedOutOfOrdernessWatermarks,
    WatermarkGenerator,
    WatermarkOutput,
    WatermarkStrategy,
)
from runtime.api.windows import (
    AllWindowedStream,
    ContinuousEventTimeTrigger,
    CountTrigger,
    EventTimeSessionWindows,
    EventTimeTrigger,
    GlobalWindow,
    GlobalWindows,
    ProcessAllWindowFunction,
    ProcessingTimeSessionWindows,
    ProcessingTimeTrigger,
    ProcessWindowFunction,
    PurgingTrigger,
    SlidingEventTimeWindows,
    SlidingProcessingTimeWindows,
    TimeWindow,
    Trigger,
    TriggerContext,
    TriggerResult,
    TumblingEventTimeWindows,
    TumblingProcessingTimeWindows,
    WindowAssigner,
    WindowContext,
    WindowedStream,
)
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.alerts import CheckpointFailureAlert, CheckpointFailureThreshold
from runtime.master.jobmaster import JobFailedError, JobResult
from runtime.shell.runner import load_job_file, run_job, run_job_async
from runtime.version import __version__ as __version__
from state.keyed import StateTtlConfig, StateVisibility, TtlUpdateType

__all__ = [
    "AggregateFunction",
    "AllWindowedStream",
    "AsyncFunction",
    "AsyncRetryStrategy",
    "AsyncTimeoutError",
    "BoundedOutOfOrdernessWatermarks",
    "CheckpointConfig",
    "CheckpointFailureAlert",
    "CheckpointFailureThreshold",
    "Collector",
    "ConnectedStreams",
    "ContinuousEventTimeTrigger",
    "CountTrigger",
    "DataStream",
    "EventTimeSessionWindows",
    "EventTimeTrigger",
    "ExecutionConfig",
    "FilterFunction",
    "FlatMapFunction",
    "GlobalWindow",
    "GlobalWindows",
    "Job",
    "JobDefinitionError",
    "JobFailedError",
    "JobParameters",
    "JobResult",
    "KeyedCoProcessFunction",
    "KeyedProcessContext",
    "KeyedProcessFunction",
    "KeyedStream",
    "MapFunction",
    "NewerOutputPolicy",
    "OutputTag",
    "PrintSink",
    "ProcessAllWindowFunction",
    "ProcessContext",
    "ProcessFunction",
    "ProcessWindowFunction",
    "ProcessingTimeSessionWindows",
    "ProcessingTimeTrigger",
    "PurgingTrigger",
    "ReduceFunction",
    "RichFunction",
    "RuntimeContext",
    "Sink",
    "SinkWriter",
    "SlidingEventTimeWindows",
    "SlidingProcessingTimeWindows",
    "Source",
    "SourceReader",
    "StateTtlConfig",
    "StateVisibility",
    "TimeWindow",
    "Trigger",
    "TriggerContext",
    "TriggerResult",
    "TtlUpdateType",
    "TumblingEventTimeWindows",
    "TumblingProcessingTimeWindows",
    "WatermarkGenerator",
    "WatermarkOutput",
    "WatermarkStrategy",
    "WindowAssigner",
    "WindowContext",
    "WindowedStream",
    "load_job_file",
    "run_job",
    "run_job_async",
]
