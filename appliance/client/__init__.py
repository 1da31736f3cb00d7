"""The clients' side: the HTTP client, the monitor stream, the CLI, the demo starter, the tuner and its load generator."""
