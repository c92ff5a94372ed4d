"""Reading runs back: MLflow queries, terminal tables, the MLflow UI server."""
