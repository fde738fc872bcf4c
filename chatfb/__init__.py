"""chatfb: a chat app that learns from the natural-language feedback of the people who use it."""

__version__ = "0.1.0"
