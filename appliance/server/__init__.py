"""The daemon's side: config, the aiohttp app and its routes, auth, state, systemd glue, metrics."""
