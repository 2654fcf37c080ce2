"""Integrations with training frameworks (optional dependencies)."""
