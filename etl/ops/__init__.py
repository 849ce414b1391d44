"""Operating the job: ``status`` (ops/status.py), ``check`` (ops/check.py), the rejects workflow
(ops/rejects.py, shown by ops/rejects_view.py) and ``offsets reset`` (ops/offsets.py), over the
database (etl.db) and Kafka (etl.kafka) packages; nothing here imports the run (etl.run)."""
