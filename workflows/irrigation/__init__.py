"""Irrigation: open a valve, run a pump until a float switch reports the tank level, shut down.

A saga over GPIO: if the level is not reached in time, the pump and the valve are put back.
"""
