"""Reading a finished output: its index, recognize, serve, report and evaluate."""
