"""Everything that executes a model: backends, runner processes, the batcher, the memory
manager and accelerator detection. Knows nothing of HTTP."""
