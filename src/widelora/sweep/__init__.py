"""widelora.sweep."""
