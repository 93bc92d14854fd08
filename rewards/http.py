"""A reward computed by a server: POST the batch as JSON, get one score per image back.

Use it to keep a large reward model (or one with conflicting dependencies) in another process or on other GPUs,
shared by several training runs. Standard library only (``urllib``); images are sent as PNG.

Protocol (one request per call, ``Content-Type: application/json``)::

    POST <url>
    {
      "prompts":  ["a red circle", ...],                 # B strings
      "images":   ["iVBORw0KGgo...", ...],               # B base64-encoded PNGs (RGB, 8 bit, the images' size)
      "metadata": {"step": 3, ...}                       # the JSON-serialisable metadata the trainer passed
    }

    200 OK
    {
      "scores": [0.31, null, ...],                       # B numbers; null = not applicable (becomes NaN)
      "info":   {"strict": [1, 0, ...]}                  # optional: extra per-image metrics (B numbers/null each)
    }

Metadata values that are tensors or numpy arrays are sent as (nested) lists; values that cannot be serialised are
left out. Failures:

- connection refused/reset, timeout, HTTP 5xx or 429: retried ``retries`` times with exponential backoff
  (``backoff * 2**attempt`` seconds), then a :class:`~rewards.base.RewardError` naming the reward and the URL;
- any other HTTP error (4xx): a :class:`~rewards.base.RewardError` at once, with the server's message;
- a response that is not JSON, lacks ``scores`` or has the wrong length: a :class:`~rewards.base.RewardError`.

A minimal server, for reference::

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            scores = [my_model(decode_png(b), p) for b, p in zip(req["images"], req["prompts"])]
            body = json.dumps({"scores": scores}).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
import torch

from .base import Reward, RewardError, quantize_uint8
from .registry import register_reward

__all__ = ["HttpReward", "encode_png_base64", "URL_ENV_VAR"]

URL_ENV_VAR = "FLOWRL_REWARD_URL"
"""Environment variable read for the URL when none is given (so ``--reward http`` works without arguments)."""


def encode_png_base64(images: torch.Tensor) -> list[str]:
    """Each image of float ``[B, 3, H, W]`` in ``[0, 1]`` as a base64 PNG (quantised as ``round(255 x)``)."""
    from PIL import Image

    out = []
    for arr in quantize_uint8(images).permute(0, 2, 3, 1).numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(arr)).save(buffer, format="PNG")
        out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return out


def _jsonable(value: Any) -> Any:
    """``value`` as JSON-compatible data, or raise TypeError."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(type(value).__name__)


def _metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in metadata.items():
        try:
            out[key] = _jsonable(value)
        except TypeError:
            continue
    return out


def _vector(values: Any, batch: int, what: str, name: str, url: str) -> torch.Tensor:
    if not isinstance(values, list) or len(values) != batch:
        got = f"{len(values)} values" if isinstance(values, list) else type(values).__name__
        raise RewardError(f"reward {name!r}: server {url} returned {got} for {what}; expected a list of {batch}")
    try:
        return torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    except (TypeError, ValueError) as exc:
        raise RewardError(f"reward {name!r}: server {url} returned non-numbers in {what}: {exc}") from exc


@register_reward("http")
class HttpReward(Reward):
    """Scores from an HTTP server (protocol in this module's docstring). Raw score = whatever the server returns
    (its formula and range are the server's); ``null`` -> NaN.

    Args:
        url: the endpoint (``http://host:port/path``); default: the ``FLOWRL_REWARD_URL`` environment variable.
        timeout: seconds to wait for one response (connect + read).
        retries: further attempts after a failed one (connection error, timeout, 5xx, 429).
        backoff: seconds before the first retry, doubled for each next one.
        name: the reward's name in logs and errors (default ``"http"``).
        headers: extra HTTP headers (e.g. an authorization token).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 0.5,
        name: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        url = url or os.environ.get(URL_ENV_VAR)
        if not url:
            raise ValueError(f"reward 'http' needs a url: pass url=... or set {URL_ENV_VAR}")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"reward 'http': url {url!r} must start with http:// or https://")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError(f"reward 'http': need timeout > 0, retries >= 0, backoff >= 0 "
                             f"(got {timeout}, {retries}, {backoff})")
        self.url, self.timeout, self.retries, self.backoff = url, float(timeout), int(retries), float(backoff)
        self.headers = dict(headers or {})
        if name:
            self.name = name

    def __repr__(self) -> str:
        return f"HttpReward(name={self.name!r}, url={self.url!r})"

    def _post(self, body: bytes) -> bytes:
        request = urllib.request.Request(
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json", **self.headers},
        )
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                detail = exc.read()[:500].decode("utf-8", "replace").strip()
                last = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
                if exc.code < 500 and exc.code != 429:
                    raise RewardError(f"reward {self.name!r}: server {self.url} refused the request ({last})") from exc
            except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
        raise RewardError(
            f"reward {self.name!r}: server {self.url} unreachable or failing after {self.retries + 1} attempt(s) "
            f"(last error: {last}); is the reward server running?"
        )

    def score(self, images: torch.Tensor, prompts: Sequence[str], **metadata: Any):
        batch = images.shape[0]
        payload = {"prompts": list(prompts), "images": encode_png_base64(images), "metadata": _metadata(metadata)}
        raw = self._post(json.dumps(payload).encode("utf-8"))
        try:
            reply = json.loads(raw)
        except ValueError as exc:
            raise RewardError(f"reward {self.name!r}: server {self.url} returned invalid JSON: {raw[:200]!r}") from exc
        if not isinstance(reply, dict) or "scores" not in reply:
            raise RewardError(f"reward {self.name!r}: server {self.url} returned no 'scores' ({str(reply)[:200]})")
        scores = _vector(reply["scores"], batch, "scores", self.name, self.url).to(images.device)
        info_in = reply.get("info") or {}
        if not isinstance(info_in, dict):
            raise RewardError(f"reward {self.name!r}: server {self.url} returned 'info' that is not an object")
        info = {str(k): _vector(v, batch, f"info[{k!r}]", self.name, self.url).to(images.device)
                for k, v in info_in.items()}
        return (scores, info) if info else scores
