"""widelora.experiments."""
