"""widelora.train."""
