"""Transforms that change a float model's weights but not what it computes."""
