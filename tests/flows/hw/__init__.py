"""Workflows for the hardware integration tests (leases, agent crash with the pump on)."""
