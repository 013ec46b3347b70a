"""A stream-processing runtime for Python on asyncio (the public API).

Write a job file with ``build(job)`` and run it with ``python -m runtime run job.py``, or run a
build function from Python with :func:`run_job`.
"""

from actors.operator import NewerOutputPolicy
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
from runtime.config import CheckpointConfig, ExecutionConfig
from runtime.master.jobmaster import JobFailedError, JobResult
from runtime.shell.runner import load_job_file, run_job, run_job_async
from state.keyed import StateTtlConfig, StateVisibility, TtlUpdateType

__all__ = [
    "AggregateFunction",
    "BoundedOutOfOrdernessWatermarks",
    "CheckpointConfig",
    "Collector",
    "ConnectedStreams",
    "DataStream",
    "ExecutionConfig",
    "FilterFunction",
    "FlatMapFunction",
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
    "ProcessContext",
    "ProcessFunction",
    "ReduceFunction",
    "RichFunction",
    "RuntimeContext",
    "Sink",
    "SinkWriter",
    "Source",
    "SourceReader",
    "StateTtlConfig",
    "StateVisibility",
    "TtlUpdateType",
    "WatermarkGenerator",
    "WatermarkOutput",
    "WatermarkStrategy",
    "load_job_file",
    "run_job",
    "run_job_async",
]
