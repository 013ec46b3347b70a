"""Shared fixtures. Kafka fixtures live in ``kafka_fixtures.py``."""
