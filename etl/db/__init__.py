"""PostgreSQL: the engine and its errors (store), the tables (schema), the COPY encoders (copy), the
run and offset rows (runs, offsets) and a cycle's write (write, reject_rows)."""
