"""The ``http`` reward client against a small local server (127.0.0.1, a handful of requests), and AsyncReward."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

from rewards import AsyncReward, HttpReward, RewardError, evaluate_reward, get_reward

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


class _Handler(BaseHTTPRequestHandler):
    """Scores = mean pixel value of each decoded PNG; behaviour switched by ``server.mode``."""

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, body: bytes, content_type: str = "application/json") -> None:
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left (the "slow" mode)
            pass

    def do_POST(self):  # noqa: N802 - http.server's naming
        from PIL import Image

        srv = self.server
        srv.requests += 1
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        srv.last = req
        mode = srv.mode
        if mode == "flaky" and srv.requests <= 2:
            return self._send(503, b"warming up")
        if mode == "bad_request":
            return self._send(400, b"prompts missing")
        if mode == "slow":
            time.sleep(0.5)
        if mode == "not_json":
            return self._send(200, b"<html>oops</html>", "text/html")
        scores = []
        for b64 in req["images"]:
            arr = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.float64)
            scores.append(arr.mean() / 255)
        if mode == "short":
            scores = scores[:-1]
        if mode == "nan_first":
            scores[0] = None
        reply = {"scores": scores}
        if mode == "info":
            reply["info"] = {"len": [len(p) for p in req["prompts"]]}
        return self._send(200, json.dumps(reply).encode())


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.mode, srv.requests, srv.last = "ok", 0, None
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=5)


def _url(srv) -> str:
    return f"http://127.0.0.1:{srv.server_address[1]}/score"


def _images(n: int = 3) -> torch.Tensor:
    return torch.linspace(0.1, 0.9, n)[:, None, None, None].expand(n, 3, 8, 8).contiguous()


def test_round_trip_scores_metadata_and_protocol(server):
    reward = get_reward("http", url=_url(server), name="brightness")
    assert isinstance(reward, HttpReward) and reward.name == "brightness"
    images = _images()
    scores, info = evaluate_reward(reward, images, PROMPTS, step=7, seeds=torch.tensor([1, 2, 3]), obj=object())
    expected = (images * 255).round() / 255
    torch.testing.assert_close(scores, expected.mean(dim=(1, 2, 3)), atol=1e-6, rtol=0)
    assert info == {}
    req = server.last
    assert req["prompts"] == PROMPTS and len(req["images"]) == 3
    assert req["metadata"] == {"step": 7, "seeds": [1, 2, 3]}  # the non-serialisable value is left out
    assert server.requests == 1


def test_null_scores_become_nan_and_info_is_returned(server):
    server.mode = "nan_first"
    scores, _ = evaluate_reward(HttpReward(_url(server)), _images(), PROMPTS)
    assert torch.isnan(scores[0]) and torch.isfinite(scores[1:]).all()
    server.mode = "info"
    _, info = evaluate_reward(HttpReward(_url(server)), _images(), PROMPTS)
    assert info["len"].tolist() == [float(len(p)) for p in PROMPTS]


def test_retries_with_backoff_then_succeeds(server):
    server.mode = "flaky"  # two 503s, then OK
    start = time.monotonic()
    scores, _ = evaluate_reward(HttpReward(_url(server), retries=2, backoff=0.05), _images(), PROMPTS)
    assert server.requests == 3 and torch.isfinite(scores).all()
    assert time.monotonic() - start >= 0.05 + 0.1  # backoff 0.05, then 0.1


def test_server_down_is_a_clear_error_naming_the_url():
    with socket.socket() as s:  # a free port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/score"
    reward = HttpReward(url, retries=1, backoff=0.01, timeout=2, name="remote_pick")
    with pytest.raises(RewardError, match=r"reward 'remote_pick'.*server http://127\.0\.0\.1:\d+/score "
                                          r"unreachable.*2 attempt"):
        evaluate_reward(reward, _images(), PROMPTS)


def test_timeout_is_retried_then_reported(server):
    server.mode = "slow"
    reward = HttpReward(_url(server), timeout=0.1, retries=1, backoff=0.0)
    with pytest.raises(RewardError, match=r"unreachable or failing after 2 attempt.*(timed out|Timeout)"):
        evaluate_reward(reward, _images(), PROMPTS)
    assert server.requests == 2


def test_client_errors_and_bad_replies_are_not_retried(server):
    server.mode = "bad_request"
    with pytest.raises(RewardError, match=r"refused the request \(HTTP 400.*prompts missing"):
        evaluate_reward(HttpReward(_url(server), retries=3), _images(), PROMPTS)
    assert server.requests == 1
    server.mode = "not_json"
    with pytest.raises(RewardError, match="invalid JSON"):
        evaluate_reward(HttpReward(_url(server)), _images(), PROMPTS)
    server.mode = "short"
    with pytest.raises(RewardError, match=r"returned 2 values for scores; expected a list of 3"):
        evaluate_reward(HttpReward(_url(server)), _images(), PROMPTS)


def test_url_from_environment_and_validation(monkeypatch, server):
    monkeypatch.setenv("FLOWRL_REWARD_URL", _url(server))
    assert get_reward("http").url == _url(server)
    monkeypatch.delenv("FLOWRL_REWARD_URL")
    with pytest.raises(ValueError, match="needs a url"):
        get_reward("http")
    with pytest.raises(ValueError, match="must start with http"):
        HttpReward("ftp://x")


def test_async_reward_overlaps_and_matches_sync(server):
    reward = HttpReward(_url(server))
    with AsyncReward(reward) as scorer:
        assert scorer.name == "http"
        a = scorer.submit(_images(3), PROMPTS, step=1)
        b = scorer.submit(_images(2), PROMPTS[:2], step=2)
        sa, _ = a.result(timeout=10)
        sb, _ = b.result(timeout=10)
        torch.testing.assert_close(sa, evaluate_reward(reward, _images(3), PROMPTS)[0])
        assert sb.shape == (2,)
        server.mode = "bad_request"
        with pytest.raises(RewardError, match="refused"):
            scorer.submit(_images(1), PROMPTS[:1]).result(timeout=10)
    with AsyncReward(lambda im, p: im.mean(dim=(1, 2, 3))) as plain:  # calling it scores synchronously
        torch.testing.assert_close(plain(_images(2), PROMPTS[:2]), _images(2).mean(dim=(1, 2, 3)))


def test_flowrl_eval_with_the_http_reward(server, tmp_path, monkeypatch):
    """``flowrl eval --reward http`` (URL from the environment) next to a built-in, on the tiny pipeline."""
    import csv

    from flowrl.cli import main
    from tests.helpers import save_tiny_sd3

    model = save_tiny_sd3(tmp_path / "tiny-sd3")
    monkeypatch.setenv("FLOWRL_REWARD_URL", _url(server))
    out = tmp_path / "eval"
    rc = main(["eval", "--output_dir", str(out), "--pretrained_model_name_or_path", str(model), "--prompts",
               "scenes:heldout", "--num_images_per_prompt", "1", "--num_inference_steps", "2",
               "--reward", "http", "--reward", "jpeg_compressibility"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rewards"]) == {"http", "jpeg_compressibility"}
    assert 0 <= res["rewards"]["http"]["mean"] <= 1 and res["rewards"]["http"]["n"] > 0
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert {"http", "jpeg_compressibility"} <= set(rows[0])
    assert server.requests == 1  # one batch (batch_size 32 >= number of heldout prompts)
