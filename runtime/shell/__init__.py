"""What users run: the CLI, the runner, progress display, the control endpoint, graceful shutdown."""
