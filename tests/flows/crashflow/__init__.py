"""Workflows of the control-flow crash tests (tests/test_flow_crash.py, run by
tests/crash/flow_runner.py) and of the control-flow properties (tests/test_flow_properties.py)."""
