"""Fault-injection suite: the real service in its own processes, a real broker, scripted receivers.

Small scenarios run in CI (`pytest tests/faults`); `python -m tests.faults.soak` runs them at size.
"""
