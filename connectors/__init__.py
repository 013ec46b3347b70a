"""Sources and sinks: collections, files, print (and Kafka, see ``connectors.kafka``)."""

from connectors.collection import CollectionSource, CollectSink, GeneratorSource
from connectors.files import (
    FileSource,
    JsonLinesFileSink,
    RecordFormatError,
    TwoPhaseCommitFileSink,
    committed_files,
)
from runtime.api.sinks import PrintSink

__all__ = [
    "CollectSink",
    "CollectionSource",
    "FileSource",
    "GeneratorSource",
    "JsonLinesFileSink",
    "PrintSink",
    "RecordFormatError",
    "TwoPhaseCommitFileSink",
    "committed_files",
]
