"""widelora.report."""
