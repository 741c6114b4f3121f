"""A custom step that reaches the board through ``context.hardware``."""


async def start_pump_then_fail(state, context, **params):
    context.hardware["pump"].on()
    raise RuntimeError("flow sensor reports no flow")


async def stop_pump(state, context, **params):
    context.hardware["pump"].off()
