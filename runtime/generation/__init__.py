"""Text generation: the request/chunk contract, the tiny test model, the engines and their
iteration-level scheduler, which run inside a model's runner process."""
