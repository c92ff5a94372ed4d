"""flowmill.launchers."""
