"""A four-step saga whose async steps take a little time (MQTT outage and outbox tests)."""
