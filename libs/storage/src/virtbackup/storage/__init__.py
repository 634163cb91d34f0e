"""Destination drivers behind one async protocol."""
