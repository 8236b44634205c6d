"""thoxd: the daemon of a local LLM appliance."""

__version__ = "0.1.0"
