"""The real fleet: devices over MQTT.

The coordinator (coordinator.FleetExecutor, the engine's executor for real devices), the secured
Mosquitto broker, edge brokers bridged to it, the janitor of retained messages, the artifact server
and next-stage prefetch, bounded logging and telemetry intake, the browser gateway and its one-time
join links, a whole local fleet on one machine, and the conformance kit for outside devices.
Uses method/ and engine/; imports nothing from cli/.
"""
