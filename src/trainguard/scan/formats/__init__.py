"""Artifact formats, each recognised by its bytes and analysed without executing anything."""
