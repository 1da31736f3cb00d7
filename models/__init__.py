"""What a model is: manifests, the store on disk, tensor specs, per-model settings and their
vocabulary, the bundled demo models.

Imports nothing else of Lastmile's, so the daemon, the runners and the tests all share one
definition of a model and of its settings. ``vocabulary`` imports only the standard library,
so the CLI and the TUI read the same names and bounds without NumPy or the runtime.
"""
