"""Shared pytest configuration: the Mosquitto broker fixture, the mock-pin board fixtures and the
store on a real SQLite file."""

pytest_plugins = ["tests._broker", "tests._hw_fixtures", "tests._store_fixture"]
