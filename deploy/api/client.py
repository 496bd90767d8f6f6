"""Python client for a running moray app over Serve deployment handles (no HTTP).

    import moray
    client = moray.connect()                        # the local Ray cluster `moray serve` started
    print(client.generate("The capital of France is", max_tokens=8, temperature=0).text)
    for delta in client.stream("Once upon a time", max_tokens=32, seed=0):
        print(delta, end="", flush=True)

The calls go to the ingress deployment's `complete` / `complete_stream` / `chat` methods, so they
share the HTTP API's validation, sampling options (`max_tokens`, `temperature`, `top_p`, `top_k`,
`seed`, `stop`, `logprobs`, ...) and errors (`moray.deploy.api.errors.APIError`, with `.status`).

Authentication (Ray >= 2.5x token auth). A cluster started by `ray.init()` / `moray serve` has token
authentication on by default, with the token in `~/.ray/auth_token` (made on first start). A second
driver on the same machine connecting with `address="auto"` finds that file and authenticates by
itself. Elsewhere, or with an explicit address (`"10.0.0.5:6379"`, `RAY_ADDRESS`), Ray does not turn
token auth on for you: pass `auth_token=...` (or set `RAY_AUTH_MODE=token` and one of
`RAY_AUTH_TOKEN`, `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token`). `ray get-auth-token` on the head
prints the token; on KubeRay it is the cluster's auth secret.

The local cluster `moray serve` starts listens on 127.0.0.1 only: a driver on the same machine joins
it (`connect` then runs this process's Ray on loopback too, see `moray.deploy.serve.network`); other
machines cannot.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from moray.deploy.api.errors import unwrap
from moray.deploy.serve.network import join_address

log = logging.getLogger(__name__)

AUTH_MODE_ENV, AUTH_TOKEN_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN"


@dataclass
class Completion:
    """One generated choice."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: dict[str, int] = field(default_factory=dict)
    id: str = ""
    logprobs: Any = None  # as the HTTP API returns them, when asked for
    prompt_logprobs: Any = None  # vLLM's shape ({token id: {logprob, rank, decoded_token}}), when asked for


class MorayClient:
    """`generate` / `stream` / `chat` on a running moray app through its ingress deployment handle."""

    def __init__(self, handle: Any, app: str = "moray") -> None:
        self.handle, self.app = handle, app

    def generate(self, prompt: str | list[int], **sampling: Any) -> Completion:
        """Complete `prompt` (text, or token ids) and return the first choice."""
        out = _result(self.handle.complete.remote({**sampling, "prompt": prompt, "return_token_ids": True}))
        return _completion(out, out["choices"][0]["text"])

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        """Text deltas of `prompt`'s completion as the tokens come (through Ray Client, `ray://`, which
        has no streaming handles: the whole text as one piece)."""
        if _through_ray_client():
            yield self.generate(prompt, **sampling).text
            return
        payload = {**sampling, "prompt": prompt}
        for chunk in _stream(self.handle.options(stream=True).complete_stream.remote(payload)):
            for choice in chunk["choices"]:
                if choice.get("text"):
                    yield choice["text"]

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Completion:
        """A chat turn in the Mixtral chat format: `messages` as OpenAI's `[{role, content}]`."""
        out = _result(self.handle.chat.remote({**sampling, "messages": messages, "return_token_ids": True}))
        return _completion(out, out["choices"][0]["message"]["content"])

    def models(self) -> list[str]:
        out: dict[str, Any] = _result(self.handle.models.remote())
        return [card["id"] for card in out["data"]]


def _through_ray_client() -> bool:
    from ray.util.client import ray as ray_client

    return bool(ray_client.is_connected())


def _completion(out: dict[str, Any], text: str) -> Completion:
    choice = out["choices"][0]
    return Completion(text=text, token_ids=list(choice.get("token_ids") or []),
                      finish_reason=choice.get("finish_reason"), usage=dict(out.get("usage") or {}),
                      id=out.get("id", ""), logprobs=choice.get("logprobs"),
                      prompt_logprobs=choice.get("prompt_logprobs") or out.get("prompt_logprobs"))


def _result(response: Any) -> Any:
    try:
        return response.result()
    except Exception as e:
        raise unwrap(e) from None


def _stream(responses: Any) -> Iterator[Any]:
    try:
        yield from responses
    except Exception as e:
        raise unwrap(e) from None
    finally:
        responses.cancel()


def connect(address: str = "auto", app: str = "moray", *, auth_token: str | None = None) -> MorayClient:
    """Join the Ray cluster at `address` ("auto", "host:6379" or "ray://host:10001") and return a client
    for the Serve application `app`. `auth_token`: the cluster's Ray auth token (module docstring)."""
    if auth_token:
        use_token(auth_token)
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=join_address(address), namespace="serve", ignore_reinit_error=True,
                 log_to_driver=False)
    handle = serve.get_app_handle(app)
    log.info("connected to Serve app %r at %s", app, address)
    return MorayClient(handle, app)


def use_token(token: str) -> None:
    """Turn Ray's token auth on for this process with `token` (what `RAY_AUTH_MODE=token` +
    `RAY_AUTH_TOKEN` do); Ray reads its config at import, so refresh it if Ray is already imported."""
    os.environ[AUTH_MODE_ENV], os.environ[AUTH_TOKEN_ENV] = "token", token
    if "ray" in sys.modules:
        try:
            from ray._raylet import Config  # type: ignore[attr-defined]  # what Ray calls itself

            Config.initialize("")
        except (ImportError, AttributeError) as e:  # a Ray without it: the env vars must do
            log.warning("could not refresh Ray's config for token auth: %s", e)
