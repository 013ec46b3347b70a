"""The public surface users import: ``from runtime import ...``, ``from connectors import ...``,
``from state import ...``, ``from connectors.kafka import ...``, ``from runtime.testing import ...``. A name dropped or renamed here
breaks users' job files, so the lists are pinned; adding a name means adding it here on purpose.
"""

from __future__ import annotations

import importlib

import pytest

PUBLIC = {
    "runtime": {
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
    },
    "connectors": {
        "CollectSink",
        "CollectionSource",
        "FileSource",
        "GeneratorSource",
        "JsonLinesFileSink",
        "PrintSink",
        "RecordFormatError",
        "TwoPhaseCommitFileSink",
        "committed_files",
    },
    "state": {
        "DEFAULT_MAX_PARALLELISM",
        "BroadcastState",
        "IncompatibleStateError",
        "KeyGroupRange",
        "KeyedStateBackend",
        "KeyedStateView",
        "ListState",
        "ListStateDescriptor",
        "MapState",
        "MapStateDescriptor",
        "OperatorListState",
        "OperatorStateStore",
        "Redistribution",
        "ReducingState",
        "ReducingStateDescriptor",
        "RestoreRefusedError",
        "StateSerializationError",
        "StateSerializer",
        "StateTtlConfig",
        "StateVisibility",
        "TtlUpdateType",
        "ValueState",
        "ValueStateDescriptor",
        "key_group_for_key",
        "key_group_range_for_subtask",
        "stable_hash",
        "subtask_for_key_group",
    },
    "runtime.testing": {
        "POINTS",
        "InjectedCrash",
        "ManualClock",
        "SimulatedService",
        "TestingSink",
        "TestingSource",
        "arm",
        "arm_from_params",
        "crash_point",
        "disarm_all",
    },
    "connectors.kafka": {
        "DeliveryGuarantee",
        "DeserializationError",
        "KafkaRecord",
        "KafkaSink",
        "KafkaSource",
    },
}


@pytest.mark.parametrize("package", sorted(PUBLIC))
def test_the_public_names_of_each_package_are_pinned_and_importable(package: str) -> None:
    module = importlib.import_module(package)
    assert set(module.__all__) == PUBLIC[package]
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


@pytest.mark.parametrize("name", ["ExecutionConfig", "CheckpointConfig"])
def test_the_config_classes_users_import_from_runtime_are_the_config_module_s(name: str) -> None:
    config = importlib.import_module("runtime.config")
    assert getattr(importlib.import_module("runtime"), name) is getattr(config, name)
