"""Kafka: the client's settings, time-outs and errors (client), the one diagnosis of a failed
connection (diagnose), what the broker says of a topic (topics), the run's consumer (source) and its
faster record reading, the one place kafka-python's internals are used (fast_records)."""
