"""Shared pytest configuration: the Mosquitto broker fixture and the mock-pin board fixtures."""

pytest_plugins = ["tests._broker", "tests._hw_fixtures"]
