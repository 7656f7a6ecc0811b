"""Benchmark harness: Conveyor, Celery and Dramatiq on the same machine, in one run.

Run ``python bench/harness.py`` (see its ``--help``). Nothing here is imported by
Conveyor itself, and no test asserts a figure: ``tests/bench`` only runs a tiny smoke pass.
"""
