"""widelora.lora."""
