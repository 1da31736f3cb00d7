"""The generation benchmark's peer: LitServe's ``OpenAISpec`` (``/v1/chat/completions``, SSE),
one inference worker whose ``predict`` yields each new token's text from one
``transformers.generate`` (the per-token streamer of :mod:`bench.generate_servers`).
A module of its own because LitServe pickles the API class into its worker."""

from __future__ import annotations

from typing import Any, Iterator

import litserve as ls


class GenerateApi(ls.LitAPI):
    def __init__(self, model_dir: str, threads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model_dir, self.threads = model_dir, threads

    def setup(self, device: str) -> None:
        from bench.generate_servers import _load

        self.tok, self.model = _load(self.model_dir, self.threads)

    def predict(self, request: Any, context: Any = None) -> Iterator[str]:
        from bench.generate_servers import _generate_tokens

        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        _, pieces = _generate_tokens(self.tok, self.model, messages, int(request.max_tokens or 64))
        yield from pieces


def serve(model_dir: str, threads: int, port: int) -> None:
    server = ls.LitServer(GenerateApi(model_dir, threads, spec=ls.OpenAISpec()), accelerator="cpu", devices=1,
                          workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=port, num_api_servers=1, log_level="warning", generate_client_file=False)
