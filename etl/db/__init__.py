"""PostgreSQL: the engine and its errors (store), the tables (schema)."""
