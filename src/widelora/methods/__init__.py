"""widelora.methods."""
