"""flowmill.train."""
