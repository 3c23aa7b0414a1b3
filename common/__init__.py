"""Shared helpers for the LLVC pipeline: audio I/O and the command-line interface."""
