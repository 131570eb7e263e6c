"""Thin VAE models built on pyvae.nn."""
