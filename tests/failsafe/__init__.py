"""Workflows, steps and the subprocess harness of tests/test_fail_safe.py."""
