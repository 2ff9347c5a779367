"""Maintainers' tools (not shipped): e.g. the README screenshot."""
