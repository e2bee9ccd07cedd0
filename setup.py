"""Setuptools shim: metadata lives in pyproject.toml.

Extensions are not compiled at install time (that would force torch into the
build environment and can pull a multi-GB download); run
``python build_extensions.py`` to build them ahead of time, or let each backend
compile on first use (cached).
"""
from setuptools import setup

setup()
