"""`unigrpo serve-reward`: any registered reward served over the reward-server protocol (rewards/remote.py).

    POST /            {"images": [base64 PNG], "prompts": [str], "metadata": [object]} → {"scores": [float]}
    GET  /health      {"status": "ok", "reward": NAME, "requests": n, "batches": n}

Built on the standard library's ThreadingHTTPServer (one thread per connection): a reward server's work is
the reward call, not HTTP, so an async framework would add a dependency without adding throughput. Concurrent
requests are batched: a request's images wait in a queue, and one worker thread takes everything queued
within `max_wait_ms` of the first (up to `max_batch` images, same image size), scores it in one reward call,
and hands each request its slice. One worker also means a reward model (CLIP on a GPU) is never called from
two threads at once.

Bad requests get a 4xx answer with {"error": "..."} (400 malformed body, 404 unknown path, 411 no length,
413 too large); a reward that raises gets 500 with its message. The server keeps serving either way.
"""
from __future__ import annotations

import json
import queue
import threading
import time
from concurrent.futures import Future
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from unigrpo.rewards.base import score
from unigrpo.rewards.remote import pngs_to_images
from unigrpo.rewards.registry import RewardSpec, build_reward, reward_names
from unigrpo.config import load_config

__all__ = ["RewardServer", "serve_reward"]

MAX_BODY = 512 * 1024 * 1024


class _BadRequest(ValueError):
    pass


def _parse_request(body: bytes) -> tuple[torch.Tensor, list[str], list[dict]]:
    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _BadRequest(f"the body is not JSON: {err}") from None
    if not isinstance(req, dict):
        raise _BadRequest("expected a JSON object with 'images', 'prompts' and 'metadata'")
    images, prompts = req.get("images"), req.get("prompts")
    metadata = req.get("metadata", [{}] * len(images) if isinstance(images, list) else None)
    if not isinstance(images, list) or not images:
        raise _BadRequest("'images' must be a non-empty list of base64 PNG strings")
    if not isinstance(prompts, list) or len(prompts) != len(images) or not all(isinstance(p, str) for p in prompts):
        raise _BadRequest(f"'prompts' must be a list of {len(images)} strings, one per image")
    if not isinstance(metadata, list) or len(metadata) != len(images) or not all(isinstance(m, dict) for m in metadata):
        raise _BadRequest(f"'metadata' must be a list of {len(images)} objects, one per image")
    if not all(isinstance(x, str) for x in images):
        raise _BadRequest("'images' must hold base64 PNG strings")
    sizes = set()
    decoded = []
    for i, x in enumerate(images):
        try:
            decoded.append(pngs_to_images([x]))
        except ValueError as err:
            raise _BadRequest(f"images[{i}]: {err}") from None
        sizes.add(tuple(decoded[-1].shape[2:]))
    if len(sizes) > 1:
        raise _BadRequest(f"images of one request must share one size, got {sorted(sizes)}")
    return torch.cat(decoded), prompts, metadata


class _Batcher:
    """One worker thread that merges queued requests into reward calls (module docstring)."""

    def __init__(self, fn, label: str, max_batch: int, max_wait_ms: float):
        self.fn, self.label, self.max_batch, self.max_wait = fn, label, max_batch, max_wait_ms / 1000
        self.q: queue.Queue = queue.Queue()
        self.batches = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reward-batcher", daemon=True)
        self.thread.start()

    def submit(self, images, prompts, metadata) -> Future:
        fut: Future = Future()
        self.q.put((images, prompts, metadata, fut))
        return fut

    def stop(self):
        self._stop.set()
        self.q.put(None)

    def _run(self):
        while not self._stop.is_set():
            first = self.q.get()
            if first is None:
                return
            group, n = [first], first[0].shape[0]
            deadline = time.monotonic() + self.max_wait
            while n < self.max_batch:
                try:
                    item = self.q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    self._stop.set()
                    break
                if item[0].shape[1:] != first[0].shape[1:] or n + item[0].shape[0] > self.max_batch:
                    self.q.put(item)   # another size, or too many: the next batch takes it
                    break
                group.append(item)
                n += item[0].shape[0]
            self._score(group)

    def _score(self, group):
        images = torch.cat([g[0] for g in group])
        prompts = [p for g in group for p in g[1]]
        metadata = [m for g in group for m in g[2]]
        self.batches += 1
        try:
            scores = score(self.fn, images, prompts, metadata, label=self.label).tolist()
        except Exception as err:
            for g in group:
                g[3].set_exception(err)
            return
        k = 0
        for g in group:
            n = g[0].shape[0]
            g[3].set_result(scores[k:k + n])
            k += n


class RewardServer:
    """A reward served over HTTP on (host, port); port 0 picks a free one (`.url` says which)."""

    def __init__(self, fn, label: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 256,
                 max_wait_ms: float = 5.0):
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch}, {max_wait_ms}")
        self.label = label
        self.batcher = _Batcher(fn, label, max_batch, max_wait_ms)
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):   # quiet: one line per request would flood a training log
                pass

            def _answer(self, code: int, obj: dict):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path.rstrip("/") == "/health":
                    self._answer(200, {"status": "ok", "reward": server.label, "requests": server.requests,
                                       "batches": server.batcher.batches})
                else:
                    self._answer(404, {"error": f"unknown path {self.path!r}; GET /health or POST /"})

            def do_POST(self):
                if self.path.rstrip("/") not in ("", "/score"):
                    self._answer(404, {"error": f"unknown path {self.path!r}; POST / with a JSON body"})
                    return
                length = self.headers.get("Content-Length")
                if length is None or not length.isdigit():
                    self._answer(411, {"error": "a Content-Length header is required"})
                    return
                if int(length) > MAX_BODY:
                    self._answer(413, {"error": f"body of {length} bytes exceeds {MAX_BODY}"})
                    return
                body = self.rfile.read(int(length))
                server.requests += 1
                try:
                    images, prompts, metadata = _parse_request(body)
                except _BadRequest as err:
                    self._answer(400, {"error": str(err)})
                    return
                try:
                    scores = server.batcher.submit(images, prompts, metadata).result()
                except Exception as err:
                    self._answer(500, {"error": f"{type(err).__name__}: {err}"})
                    return
                self._answer(200, {"scores": scores})

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.host, self.port = self.httpd.server_address[:2]
        self.url = f"http://{self.host}:{self.port}/"
        self._thread: threading.Thread | None = None

    def start(self) -> "RewardServer":
        """Serve from a background thread (tests, notebooks); returns self."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="reward-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self):
        self.httpd.serve_forever()

    def close(self):
        self.httpd.shutdown() if self._thread else None
        self.httpd.server_close()
        self.batcher.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def serve_reward(argv: list[str] | None = None) -> int:
    """`unigrpo serve-reward --reward NAME [--host H] [--port P] [--max-batch N] [--max-wait-ms T] [key=value ...]`;
    key=value pairs are the reward's options (its `rewards:` entry's fields: path=..., function=..., url=...)."""
    import argparse
    import sys


    ap = argparse.ArgumentParser(prog="unigrpo serve-reward", description=serve_reward.__doc__)
    ap.add_argument("--reward", required=True, help=f"a registered reward: {', '.join(reward_names())}")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port (0 = any free one)")
    ap.add_argument("--max-batch", type=int, default=256, help="most images per reward call")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to join")
    ap.add_argument("options", nargs="*", help="the reward's options as key=value (e.g. path=/models/clip)")
    args = ap.parse_args(argv)
    try:
        spec = load_config(RewardSpec, None, [f"name={args.reward}", *args.options])
        srv = RewardServer(build_reward(spec), spec.label, args.host, args.port, args.max_batch, args.max_wait_ms)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"unigrpo serve-reward: error: {err}", file=sys.stderr)
        return 2
    print(f"serving reward {spec.label!r} on {srv.url} (GET {srv.url}health); Ctrl-C stops", flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.httpd.server_close()
        srv.batcher.stop()
    return 0
