"""What a model is: manifests, the store on disk, tensor specs, the bundled demo models.

Imports nothing else of Lastmile's, so the daemon, the runners and the tests all share one
definition of a model and of its settings.
"""
