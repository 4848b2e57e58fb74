"""Thin usage examples (not installed): ``python -m examples.online_merge_plain``, ..."""
