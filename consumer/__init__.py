"""Perkamo webhook delivery consumer: Kafka events in, HTTPS webhooks out, every attempt in ClickHouse."""

__version__ = "0.1.0"
