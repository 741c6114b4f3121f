"""Shared pytest configuration."""

pytest_plugins = ["tests._broker"]
