"""The LLVC model."""
