"""Step functions and a state model used by the engine tests (dotted paths ``tests.flows.engine``)."""
