"""MQTT out: the publisher (aiomqtt, bounded buffer, reconnect), the embedded broker, the telemetry
payloads (state, devices, stats). Topics are built only by `pipeline.topics`."""
