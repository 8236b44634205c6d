"""What wraps every request before a handler sees it: LAN sources and Host names, browser
origins, body size, slow clients, and the shutdown gate. `create_app()` stacks them in order."""
