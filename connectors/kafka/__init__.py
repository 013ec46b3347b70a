"""Kafka connectors on aiokafka: partitions as splits with offsets in operator state, and a sink
that writes at least once or, in transactions committed with checkpoints, exactly once.

- :mod:`connectors.kafka.source`: ``KafkaSource`` and its reader.
- :mod:`connectors.kafka.sink`: ``KafkaSink`` (at-least-once writer).
- :mod:`connectors.kafka.exactly_once`: the exactly-once writer (two-phase commit).
- :mod:`connectors.kafka.transactions`: the transactional producer Tansu needs.
- :mod:`connectors.kafka.clients`: the one factory of every Kafka client.
- :mod:`connectors.kafka.broker`: the local Kafka-protocol broker for tests and the dev loop.
"""

from connectors.kafka.sink import DeliveryGuarantee, KafkaSink
from connectors.kafka.source import DeserializationError, KafkaRecord, KafkaSource

__all__ = ["DeliveryGuarantee", "DeserializationError", "KafkaRecord", "KafkaSink", "KafkaSource"]
