"""Checkpoint I/O: sources by URI, header-first readers, streaming writer, atomic publish."""
