"""flowmill.models."""
