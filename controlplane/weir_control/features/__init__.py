"""The feature store: definitions (entities, feature views, feature services), point-in-time
correct historical retrieval on DuckDB over Parquet, and (to come) the online store and enrichment."""
