"""What the command-line clients of the HTTP API share (`tokenmill submit`, `jobs`, `batch`,
`usage`): the `Api` client, finding the API and its key, and the way they fail.

They speak only HTTP (httpx) with a Bearer key, like any other client. The API's address and key
come from --api-url / --api-key, else TOKENMILL_API_URL / TOKENMILL_API_KEY, else the stack that
`tokenmill up` runs with this data directory (its state file and the key it made).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

import typer

from tokenmill.command import tokenmill_command

ApiUrl = typer.Option(None, "--api-url", help="The API [default: TOKENMILL_API_URL, else the one `tokenmill up` runs].")
ApiKey = typer.Option(None, "--api-key", help="Bearer key [default: TOKENMILL_API_KEY, else the local key `tokenmill up` made].")


class ApiFailure(Exception):
    """A request that did not succeed; the message is for the user."""


class Api:
    """A thin httpx client that turns failures into one clear line."""

    def __init__(self, url: str, key: str, timeout_s: float = 30.0) -> None:
        import httpx

        self.url = url.rstrip("/")
        self._httpx = httpx
        self.client = httpx.Client(base_url=self.url, timeout=timeout_s,
                                   headers={"Authorization": f"Bearer {key}", "User-Agent": "tokenmill-cli"})

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Sends a request; returns the decoded JSON body (raises ApiFailure otherwise)."""
        try:
            resp = self.client.request(method, path, **kwargs)
        except self._httpx.ConnectError:
            raise ApiFailure(f"cannot reach the API at {self.url}: is `{tokenmill_command()} up` (or `api`) running? "
                             "Set --api-url or TOKENMILL_API_URL for another address.") from None
        except self._httpx.TimeoutException:
            raise ApiFailure(f"the API at {self.url} did not answer {method} {path} in time") from None
        if resp.status_code >= 400:
            raise ApiFailure(_error_text(resp))
        return resp.json() if resp.content else None

    def download(self, path: str, out: Path) -> int:
        """Streams a response body into ``out``; returns the bytes written."""
        written = 0
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".part")
        try:
            with self.client.stream("GET", path) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise ApiFailure(_error_text(resp))
                with open(tmp, "wb") as f:
                    for chunk in resp.iter_bytes():
                        f.write(chunk)
                        written += len(chunk)
        except self._httpx.ConnectError:
            raise ApiFailure(f"cannot reach the API at {self.url}") from None
        tmp.replace(out)
        return written


def _error_text(resp: Any) -> str:
    try:
        body = resp.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            message = err.get("message") or json.dumps(err)
        else:
            message = body.get("detail") if isinstance(body, dict) else str(body)
    except ValueError:
        message = resp.text[:300]
    hint = " (check --api-key / TOKENMILL_API_KEY)" if resp.status_code == 401 else ""
    return f"HTTP {resp.status_code}: {message}{hint}"


def connect(api_url: str | None, api_key: str | None) -> Api:
    """The API client for a command, from options, settings or the local `tokenmill up`."""
    from tokenmill.settings import Settings
    from tokenmill.up_state import local_address, read_state, secrets_dir

    settings = Settings.from_env()
    state = read_state(settings) or {}
    host = local_address(settings.api_host)
    url = api_url or settings.api_url or state.get("api_url") or f"http://{host}:{settings.api_port}"
    key = api_key or settings.api_key
    if not key:
        try:
            key = (secrets_dir(settings) / "local.key").read_text().strip()
        except OSError:
            key = ""
    if not key:
        fail(f"no API key: set TOKENMILL_API_KEY or pass --api-key (`{tokenmill_command()} up` makes a local one on "
             f"its first start; `{tokenmill_command()} keys create --tenant NAME` makes others)")
    return Api(url, key)


def default_model(model: str | None) -> str:
    """The model a command asks for: the option, else the running stack's, else TOKENMILL_MODEL's name."""
    import os

    from tokenmill.settings import Settings
    from tokenmill.up_state import read_state

    if model:
        return model
    settings = Settings.from_env()
    state = read_state(settings) or {}
    return state.get("model") or os.path.basename(os.path.normpath(settings.model))


def fail(message: str, code: int = 1) -> NoReturn:
    """Prints ``error: message`` on stderr and exits with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def console(stderr: bool = True) -> Any:
    """A rich console on stderr (progress, status) or stdout (tables)."""
    from rich.console import Console

    out = Console(stderr=stderr)
    # Piped into a file or another program: wide lines rather than wrapped cells.
    return out if out.is_terminal else Console(stderr=stderr, width=200)
