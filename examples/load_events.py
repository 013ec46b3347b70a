"""Load the sample events (``data/events.jsonl``) into a Kafka topic, keyed by user.

    python examples/load_events.py --bootstrap 127.0.0.1:9092 [--topic events] [--partitions 4]

Creates the topic if it does not exist.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

EVENTS = Path(__file__).parent / "data" / "events.jsonl"


async def load(bootstrap: str, topic: str, partitions: int, lines: list[bytes], repeat: int) -> int:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    except TopicAlreadyExistsError:
        pass
    finally:
        await admin.close()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    sent = 0
    try:
        for _ in range(repeat):
            for line in lines:
                event = orjson.loads(line)
                await producer.send(topic, line, key=event["user"].encode())
                sent += 1
        await producer.flush()
    finally:
        await producer.stop()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--topic", default="events")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--file", type=Path, default=EVENTS)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    lines = args.file.read_bytes().splitlines()
    sent = asyncio.run(load(args.bootstrap, args.topic, args.partitions, lines, args.repeat))
    print(f"loaded {sent} events into topic {args.topic!r} on {args.bootstrap}")


if __name__ == "__main__":
    main()
