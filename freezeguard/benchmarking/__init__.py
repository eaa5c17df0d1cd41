"""Pieces of ``freezeguard bench``: model presets, the fine-tuning step measurement, the learner step.

The orchestration (configs, table, JSON, PNG) lives in :mod:`freezeguard.bench`.
"""
