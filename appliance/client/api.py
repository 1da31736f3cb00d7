"""The one client of the daemon's API, used by the CLI, the TUI and scripts (aiohttp over the
Unix socket, or TCP with a bearer token). Failures come out as :class:`ClientError` subclasses
whose text is fit to show an operator as is."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import numpy as np

from lastmile.appliance.v2codec import HEADER_LENGTH, decode_response, encode_request


class ClientError(Exception):
    """Something the operator should read; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class DaemonNotRunning(ClientError):
    exit_code = 3


class PermissionDenied(ClientError):
    exit_code = 4


class ApiError(ClientError):
    def __init__(self, status: int, message: str, field: str | None = None, body: Any = None) -> None:
        super().__init__(f"{message} (HTTP {status}{', field ' + field if field else ''})")
        self.status, self.message, self.field = status, message, field
        self.body = body if isinstance(body, dict) else {}  # the error's JSON body (a 507's "memory": options)
        self.exit_code = 5 if status >= 500 else 1


class LastmileClient:
    """``async with LastmileClient(socket_path) as c: await c.status()``."""

    def __init__(self, socket_path: Path | str | None = None, *, url: str | None = None, token: str | None = None, timeout_s: float = 600.0) -> None:
        if (socket_path is None) == (url is None):
            raise ValueError("give exactly one of socket_path or url")
        self.socket_path = Path(socket_path) if socket_path is not None else None
        self.base_url = url.rstrip("/") if url else "http://lastmile"
        self.token = token
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return str(self.socket_path) if self.socket_path else self.base_url

    async def __aenter__(self) -> "LastmileClient":
        connector = aiohttp.UnixConnector(path=str(self.socket_path)) if self.socket_path else aiohttp.TCPConnector()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._session = aiohttp.ClientSession(connector=connector, headers=headers, timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _raw(self, method: str, path: str, *, json_body: Any = None, data: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        if self._session is None:
            await self.__aenter__()
        assert self._session is not None
        with self._transport_errors(path, f"request to {self.where}{path} timed out after {self.timeout.total} s"):
            async with self._session.request(method, self.base_url + path, json=json_body, data=data, headers=headers) as resp:
                return resp.status, dict(resp.headers), await resp.read()

    @contextlib.contextmanager
    def _transport_errors(self, path: str, timeout_message: str) -> Iterator[None]:
        """aiohttp's connection failures as the errors the CLI and TUI explain to a person."""
        try:
            yield
        except aiohttp.ClientConnectorError as exc:
            os_error = getattr(exc, "os_error", None)
            if isinstance(os_error, PermissionError):
                raise PermissionDenied(f"permission denied on {self.where}: join the 'lastmile' group (or run as root)") from None
            if isinstance(os_error, (FileNotFoundError, ConnectionRefusedError)):
                raise DaemonNotRunning(f"the daemon is not running on {self.where} (start it with 'lastmile serve')") from None
            raise DaemonNotRunning(f"cannot connect to {self.where}: {exc}") from None
        except aiohttp.ServerDisconnectedError:
            raise DaemonNotRunning(f"the daemon at {self.where} closed the connection") from None
        except aiohttp.ClientError as exc:
            raise ClientError(f"request to {self.where}{path} failed: {exc}") from None
        except TimeoutError:
            raise ClientError(timeout_message) from None

    @contextlib.asynccontextmanager
    async def stream(self, path: str, body: Any, *, read_timeout_s: float = 300.0) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST ``body`` and hand over the response with its body unread, for SSE / NDJSON
        streams (text generation). No total timeout (a long answer is not a failure); a stream
        that sends nothing for ``read_timeout_s`` fails. A 4xx/5xx raises :class:`ApiError`,
        whether its body is Lastmile's ``{"error": str}`` or OpenAI's ``{"error": {"message", "param"}}``."""
        if self._session is None:
            await self.__aenter__()
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=read_timeout_s)
        with self._transport_errors(path, f"{self.where}{path} sent nothing for {read_timeout_s:g} s"):
            async with self._session.post(self.base_url + path, json=body, timeout=timeout) as resp:
                if resp.status >= 400:
                    payload = await resp.read()
                    try:
                        data = json.loads(payload)
                    except ValueError:
                        data = {"error": payload.decode(errors="replace")}
                    error = data.get("error") if isinstance(data, dict) else None
                    if isinstance(error, dict):  # OpenAI's shape
                        raise ApiError(resp.status, str(error.get("message")), error.get("param"))
                    raise ApiError(resp.status, str(error or f"HTTP {resp.status}"), data.get("field") if isinstance(data, dict) else None)
                yield resp

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        status, _, payload = await self._raw(method, path, json_body=body)
        data: Any = None
        if payload:
            try:
                data = json.loads(payload)
            except ValueError:
                data = {"error": payload.decode(errors="replace")}
        if status >= 400:
            error = data.get("error", f"HTTP {status}") if isinstance(data, dict) else f"HTTP {status}"
            raise ApiError(status, error, data.get("field") if isinstance(data, dict) else None, data)
        return data

    # --- V2 ------------------------------------------------------------------------------

    async def live(self) -> bool:
        return (await self._raw("GET", "/v2/health/live"))[0] == 200

    async def ready(self) -> bool:
        return (await self._raw("GET", "/v2/health/ready"))[0] == 200

    async def server(self) -> dict[str, Any]:
        return await self.request("GET", "/v2")

    async def metadata(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/v2/models/{name}")

    async def repository_index(self) -> list[dict[str, Any]]:
        return await self.request("POST", "/v2/repository/index", {})

    async def load(self, name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self.request("POST", f"/v2/repository/models/{name}/load", {"parameters": parameters or {}})

    async def unload(self, name: str, *, drain: bool = False) -> None:
        """``drain``: the daemon lets running streams and queued batches end first."""
        await self.request("POST", f"/v2/repository/models/{name}/unload", {"parameters": {"drain": True}} if drain else {})

    async def infer(self, name: str, inputs: dict[str, np.ndarray], datatypes: dict[str, str], *, binary: bool = True) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Outputs as arrays and the response ``parameters`` (batch id/size, timings).

        ``binary`` uses the binary tensor data extension both ways (no float text round trip).
        """
        body, headers = encode_request(inputs, datatypes, binary=binary)
        started = time.perf_counter()
        status, response_headers, payload = await self._raw("POST", f"/v2/models/{name}/infer", data=body, headers=headers)
        elapsed = time.perf_counter() - started
        if status >= 400:
            err = json.loads(payload) if payload.startswith(b"{") else {"error": payload.decode(errors="replace")}
            raise ApiError(status, err.get("error", f"HTTP {status}"), err.get("field"))
        outputs, params = decode_response(payload, response_headers.get(HEADER_LENGTH))
        params["client_ms"] = round(elapsed * 1000, 3)
        return outputs, params

    # --- /lm/v1 ------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.request("GET", "/lm/v1/status")

    async def system(self) -> dict[str, Any]:
        return await self.request("GET", "/lm/v1/system")

    async def models(self) -> dict[str, Any]:
        return await self.request("GET", "/lm/v1/models")

    async def model(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/lm/v1/models/{name}")

    async def tune(self, name: str, settings: dict[str, Any]) -> dict[str, Any]:
        return await self.request("PATCH", f"/lm/v1/models/{name}", {"settings": settings})

    async def events(self, since: int = 0) -> list[dict[str, Any]]:
        return (await self.request("GET", f"/lm/v1/events?since={since}"))["events"]

    async def config(self) -> dict[str, Any]:
        return await self.request("GET", "/lm/v1/config")
