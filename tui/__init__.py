"""The Textual terminal UI: ``lastmile tui``. A client of the daemon's public API only
(:class:`appliance.client.LastmileClient` and the ``/v1/monitor`` stream); it never imports
the runtime."""
