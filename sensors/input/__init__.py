"""The ``input`` sensor plugin and its pynput and evdev backends."""
