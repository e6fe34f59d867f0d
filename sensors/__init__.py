"""Sensor plugins: the interface, the registry and the built-in plugins."""
