"""Workflows, steps and a subprocess harness for the agent service, CLI and retention tests."""
