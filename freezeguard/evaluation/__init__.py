"""Pieces of the evaluation harness (freezeguard.evaluate): the figures, the report, the toy setup."""
