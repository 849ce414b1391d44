"""Kafka: the client's settings, time-outs and errors (client), the one diagnosis of a failed
connection (diagnose) and what the broker says of a topic (topics)."""
