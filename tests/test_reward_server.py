"""Remote rewards over real HTTP on 127.0.0.1: the project's reward server and client, a bare server that
misbehaves in each way the client must survive or name, and the VLM judge against a local chat-completions
server."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import requests
import torch

from _images import render_batch
from unigrpo.data import shapes_records
from unigrpo.rewards.base import RewardError, score
from unigrpo.rewards.registry import RewardSet, RewardSpec, build_reward
from unigrpo.rewards.remote import RemoteReward, images_to_png, pngs_to_images
from unigrpo.rewards.server import RewardServer
from unigrpo.rewards.verifier import ShapesVerifierReward
from unigrpo.rewards.vlm_judge import VlmJudgeReward
from unigrpo.world import make_prompts, sample_layout


def _batch(n=10, seed=1):
    recs = shapes_records("train", n, seed)
    prompts = make_prompts("train", n, seed=seed)
    images = render_batch([sample_layout(p, np.random.default_rng(i)) for i, p in enumerate(prompts)])
    images[::2] = -1.0
    return images, [r.text for r in recs], [r.metadata for r in recs]


def test_png_round_trip_is_what_the_verifier_sees():
    images, _, _ = _batch(4)
    back = pngs_to_images(images_to_png(images))
    assert torch.equal(back, images)          # renders are exact uint8 levels, so nothing is lost


def test_project_server_and_client_agree_with_the_local_reward():
    images, texts, metas = _batch(10)
    local = score(ShapesVerifierReward("ta"), images, texts, metas)
    assert 0 < local.mean() < 1
    with RewardServer(build_reward(RewardSpec("shapes_ta")), "shapes_ta") as srv:
        health = requests.get(srv.url + "health", timeout=5).json()
        assert health["status"] == "ok" and health["reward"] == "shapes_ta"
        client = RemoteReward(srv.url, batch_size=3, concurrency=4, timeout=10, retries=0, label="r")
        got = score(client, images, texts, metas, label="r")
        assert torch.equal(got, local)
        assert client.requests_sent == 4          # 10 images in requests of 3
        # concurrent requests are merged into fewer reward calls
        before = requests.get(srv.url + "health", timeout=5).json()["batches"]
        client = RemoteReward(srv.url, batch_size=1, concurrency=10, timeout=10, retries=0)
        assert torch.equal(score(client, images, texts, metas), local)
        batches = requests.get(srv.url + "health", timeout=5).json()["batches"] - before
        assert 1 <= batches <= 10


@pytest.mark.parametrize("body, code, match", [
    (b"not json", 400, "not JSON"),
    (b'{"images": [], "prompts": []}', 400, "non-empty list"),
    (b'{"images": ["aGVsbG8="], "prompts": ["x"]}', 400, r"images\[0\]: not a base64-encoded image"),
    (b'{"images": ["x"], "prompts": ["a", "b"]}', 400, "list of 1 strings"),
])
def test_server_answers_bad_requests_with_4xx_json(body, code, match):
    with RewardServer(build_reward(RewardSpec("shapes_ta")), "shapes_ta") as srv:
        r = requests.post(srv.url, data=body, timeout=5)
        assert r.status_code == code
        assert __import__("re").search(match, r.json()["error"])
        assert requests.get(srv.url + "health", timeout=5).status_code == 200   # still serving
        assert requests.get(srv.url + "nope", timeout=5).status_code == 404


def test_server_reports_a_failing_reward_as_500_and_keeps_serving():
    calls = []

    def flaky(images, prompts, metadata):
        calls.append(len(prompts))
        if len(calls) == 1:
            raise RuntimeError("model fell over")
        return torch.ones(len(prompts))

    images, texts, metas = _batch(2)
    with RewardServer(flaky, "flaky") as srv:
        body = {"images": images_to_png(images[:1]), "prompts": texts[:1], "metadata": metas[:1]}
        r = requests.post(srv.url, json=body, timeout=5)
        assert r.status_code == 500 and "model fell over" in r.json()["error"]
        assert requests.post(srv.url, json=body, timeout=5).json() == {"scores": [1.0]}


class _Bad(BaseHTTPRequestHandler):
    """A bare reward server that misbehaves as told by its `mode` class attribute."""
    mode = "ok"
    hits = 0

    def log_message(self, *a):
        pass

    def do_POST(self):
        n = len(json.loads(self.rfile.read(int(self.headers["Content-Length"]))).get("images", [None]))
        type(self).hits += 1
        m = self.mode
        if m == "sleep":
            time.sleep(1.0)
        status, body = 200, json.dumps({"scores": [0.5] * n})
        if m == "500":
            status, body = 500, "internal error"
        elif m == "malformed":
            body = "{scores: [0.5"
        elif m == "few":
            body = json.dumps({"scores": [0.5] * (n - 1)})
        elif m == "nan":
            body = '{"scores": [' + ", ".join(["NaN"] + ["0.5"] * (n - 1)) + "]}"
        data = body.encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass


@pytest.fixture
def bad_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Bad)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("mode, match", [
    ("sleep", "no answer within the timeout of 0.2 s"),
    ("500", "HTTP 500"),
    ("malformed", "not JSON"),
    ("few", "answered 2 scores for 3 images"),
    ("nan", "score 0 is nan, not a finite number"),
])
def test_each_fault_is_retried_then_named(bad_server, mode, match):
    _Bad.mode, _Bad.hits = mode, 0
    images, texts, metas = _batch(3)
    client = RemoteReward(bad_server, batch_size=8, timeout=0.2, retries=2, backoff=0.01, label="geneval")
    with pytest.raises(RewardError, match=rf"reward 'geneval' at {bad_server}: samples 0..2 .*after 3 attempts: .*{match}"):
        score(client, images, texts, metas, label="geneval")
    assert _Bad.hits == 3                      # one try + two retries
    _Bad.mode = "ok"                           # the same client works once the server does
    assert score(client, images, texts, metas).tolist() == [0.5] * 3


class _Chat(BaseHTTPRequestHandler):
    """A local OpenAI-compatible chat-completions endpoint: answers 'Score: k' with k = the caption's length mod
    11, except 'garbled' captions."""
    seen = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/chat/completions"
        content = req["messages"][0]["content"]
        img = [c for c in content if c["type"] == "image_url"][0]["image_url"]["url"]
        text = [c for c in content if c["type"] == "text"][0]["text"]
        caption = text.split("Caption: ")[1].split("\n")[0]
        type(self).seen.append((img[:22], req.get("model")))
        answer = "I cannot tell." if "garbled" in caption else f"Looks fine.\nScore: {len(caption) % 11}"
        data = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_vlm_judge_against_a_local_chat_server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Chat)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
        images = torch.zeros(4, 3, 8, 8)
        captions = ["a cat", "a garbled thing", "two dogs on a sofa", "x"]
        judge = VlmJudgeReward(url, model="judge-7b", retries=0, concurrency=2)
        s = score(judge, images, captions, [{}] * 4, label="judge")
        want = [len(c) % 11 / 10 for c in captions]
        assert s[[0, 2, 3]].tolist() == pytest.approx([want[0], want[2], want[3]])
        assert torch.isnan(s[1]) and judge.unparsed == 1      # counted, never scored 0
        assert all(u == "data:image/png;base64," and m == "judge-7b" for u, m in _Chat.seen)
        # in a reward set the abstained sample takes its group's mean, and the count is a metric
        rs = RewardSet([RewardSpec("vlm_judge", url=url, retries=0, label="judge")])
        total, each, extra = rs(images, captions, [{}] * 4, group_size=2)
        assert extra["reward/judge/abstained"] == 1.0
        assert total[1].item() == pytest.approx(want[0])
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_vlm_judge_parse_and_its_options():
    j = VlmJudgeReward("http://127.0.0.1:9/v1", score_range=(1, 5))
    assert j.parse("score = 5") == 1.0 and j.parse("Score: 1") == 0.0 and j.parse("Score: 3.0") == 0.5
    assert j.parse("Score: 9") == 1.0                    # clamped
    assert j.parse("no number") != j.parse("no number")  # NaN
    with pytest.raises(ValueError, match="must contain"):
        VlmJudgeReward("http://x", template="no caption here")
    with pytest.raises(ValueError, match="one group"):
        VlmJudgeReward("http://x", pattern=r"\d+")


def test_serve_reward_command_serves_and_refuses_bad_options():
    """`unigrpo serve-reward` as the README runs it: a real process on 127.0.0.1, port 0 = any free one."""
    import subprocess
    import sys

    bad = subprocess.run([sys.executable, "-m", "unigrpo", "serve-reward", "--reward", "nope"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "'nope' is not registered" in bad.stderr
    proc = subprocess.Popen([sys.executable, "-m", "unigrpo", "serve-reward", "--reward", "shapes_geneval", "--port",
                             "0"], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving reward 'shapes_geneval' on http://127.0.0.1:" in line
        url = line.split(" on ")[1].split(" ")[0]
        images, texts, metas = _batch(4)
        got = score(RemoteReward(url, retries=0, timeout=30), images, texts, metas)
        assert torch.equal(got, score(ShapesVerifierReward("geneval"), images, texts, metas))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_vlm_judge_transport_faults_are_retried_then_named(bad_server):
    _Bad.mode, _Bad.hits = "500", 0
    judge = VlmJudgeReward(bad_server.rstrip("/") + "/v1", retries=1, backoff=0.01, label="judge")
    with pytest.raises(RewardError, match=r"reward 'judge' at .*/v1/chat/completions: sample 0 .*after 2 attempts: HTTP 500"):
        score(judge, torch.zeros(1, 3, 8, 8), ["a cat"], [{}], label="judge")
    assert _Bad.hits == 2
