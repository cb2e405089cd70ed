"""Placeholder package: arrives with its own issue (see DESIGN.md)."""
