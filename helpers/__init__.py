"""Helpers for the course notebooks: each function names the notebook that teaches it. No import-time side effects."""
