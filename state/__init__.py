"""Keyed and operator state, their snapshot encoding and key groups."""

from state.keyed import (
    IncompatibleStateError,
    KeyedStateBackend,
    KeyedStateView,
    ListState,
    ListStateDescriptor,
    MapState,
    MapStateDescriptor,
    ReducingState,
    ReducingStateDescriptor,
    StateTtlConfig,
    StateVisibility,
    TtlUpdateType,
    ValueState,
    ValueStateDescriptor,
)
from state.keygroups import (
    DEFAULT_MAX_PARALLELISM,
    KeyGroupRange,
    key_group_for_key,
    key_group_range_for_subtask,
    stable_hash,
    subtask_for_key_group,
)
from state.operator import (
    BroadcastState,
    OperatorListState,
    OperatorStateStore,
    ReadOnlyBroadcastState,
    ReadOnlyStateError,
    Redistribution,
)
from state.refusal import RestoreRefusedError
from state.serde import StateSerializationError, StateSerializer

__all__ = [
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
    "ReadOnlyBroadcastState",
    "ReadOnlyStateError",
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
]
