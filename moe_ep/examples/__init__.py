"""Runnable examples (python -m moe_ep.examples.<name>); each needs its own extras."""
