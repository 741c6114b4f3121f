"""Crash-test workflow: step modules, its YAML and the runner script killed by the crash tests."""
