"""Integrations of pyvae's layers into other libraries' models (each imports its library lazily)."""
