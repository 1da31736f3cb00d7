"""The daemon and its clients: config, the aiohttp API, state, systemd glue, the CLI."""

__version__ = "0.1.0"
