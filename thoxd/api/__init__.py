"""HTTP handlers: thin layers over the engine, one module per surface."""
