"""The Textual terminal UI: ``lastmile tui``. A client of the daemon's public API only
(:class:`lastmile.appliance.client.api.LastmileClient` and the ``/lm/v1/monitor`` stream); it never imports
the runtime."""
