"""The DuckDB log store: the write engine and queries (db), the schema (migrations), the record types (records)."""
