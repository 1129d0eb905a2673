"""Training on the user's own prompts and rewards, end to end: a GenEval-format JSONL of shapes prompts phrased
another way, scored by `unigrpo serve-reward`'s server on 127.0.0.1 (real HTTP); a reward server that breaks
mid-run stops the run with a named error, leaves the last checkpoint whole, and the same config resumes."""
import json
import os
import threading
from http.server import ThreadingHTTPServer

import pytest

from test_reward_server import _Bad
from test_trainer import small_cfg, tiny_base
from unigrpo.checkpoint import load_checkpoint
from unigrpo.data import DataConfig, shapes_records, write_prompt_file
from unigrpo.data.prompts import PromptRecord
from unigrpo.evaluate import EvalConfig, evaluate, headline
from unigrpo.rewards.base import RewardError
from unigrpo.rewards.registry import RewardSpec, build_reward
from unigrpo.rewards.server import RewardServer
from unigrpo.trainer import Trainer


def _geneval_file(path, split="train", n=12):
    recs = [PromptRecord(f"draw {r.text}", r.tag, r.metadata) for r in shapes_records(split, n, seed=4)]
    write_prompt_file(str(path), recs)
    return str(path)


def test_one_iteration_with_a_served_reward_matches_the_local_reward(tmp_path):
    tiny_base(tmp_path / "base")
    data = _geneval_file(tmp_path / "train.jsonl")
    with RewardServer(build_reward(RewardSpec("shapes_ta")), "shapes_ta") as srv:
        cfg = small_cfg(tmp_path, iterations=1, data=DataConfig(data, data),
                        rewards=[RewardSpec("remote", url=srv.url, label="served", retries=0, timeout=30),
                                 RewardSpec("shapes_ta", weight=0.0, label="local")])
        tr = Trainer(cfg, progress=False)
        hist = tr.train()
    m = hist[0]
    assert m["reward/served"] == m["reward/local"] == m["reward/mean"]   # same scores through HTTP
    assert {k for k in m if k.startswith("reward_tag/")} <= {f"reward_tag/{r.tag}" for r in tr.source.records}
    assert "loss" in m and m["step"] == 0
    assert len(tr.source) == 12 and tr.source.records[0].text.startswith("draw ")


def test_reward_failure_stops_the_run_keeps_the_checkpoint_and_resumes(tmp_path):
    tiny_base(tmp_path / "base")
    data = _geneval_file(tmp_path / "train.jsonl")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Bad)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        def cfg(iterations):
            return small_cfg(tmp_path, iterations=iterations, checkpoint_every=1, data=DataConfig(data, data),
                             rewards=[RewardSpec("remote", url=url, label="geneval", retries=1, backoff=0.01,
                                                 timeout=5)])
        _Bad.mode = "ok"
        Trainer(cfg(2), progress=False).train()
        ckpt = os.path.join(str(tmp_path / "run"), "checkpoint")
        assert json.load(open(os.path.join(ckpt, "meta.json")))["step"] == 2
        _Bad.mode = "few"                        # the server breaks: two scores short
        tr = Trainer(cfg(4), progress=False)
        assert tr.step == 2
        with pytest.raises(RewardError, match=rf"reward 'geneval' at {url}: samples 0\.\.\d+ .*after 2 attempts"):
            tr.train()
        ck = load_checkpoint(ckpt)               # the previous checkpoint is whole and still step 2
        assert ck.trainer_state["step"] == 2
        assert not [f for f in os.listdir(str(tmp_path / "run")) if f.startswith(".tmp") or f.endswith(".tmp")]
        _Bad.mode = "ok"                         # fixed: the same command resumes and finishes
        tr = Trainer(cfg(4), progress=False)
        assert tr.step == 2
        hist = tr.train()
        assert [m["step"] for m in hist] == [2, 3] and tr.step == 4
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_eval_on_a_geneval_file_reports_per_tag_scores(tmp_path):
    b = tiny_base(tmp_path / "base")
    data = _geneval_file(tmp_path / "held.jsonl", "heldout", n=18)
    cfg = EvalConfig(checkpoint=str(tmp_path / "base"), samples=18, steps=4, batch=9, data=DataConfig(eval=data))
    res = evaluate(b, cfg, progress=False)
    s = res.summary
    assert set(s["overall"]["rewards"]) == {"shapes_ta", "shapes_geneval", "shapes_exact"}   # total = geneval
    assert headline(s) == ("shapes_geneval", s["overall"]["rewards"]["shapes_geneval"]["mean"])
    tags = {r.tag for r in shapes_records("heldout", 18, seed=4)}
    assert set(s) == tags | {"overall"}
    assert sum(s[t]["n"] for t in tags) == s["overall"]["n"] == 18
    ta = res.scores["shapes_ta"]
    assert s["overall"]["rewards"]["shapes_ta"]["mean"] == pytest.approx(float(ta.mean()))
    lo, hi = s["overall"]["rewards"]["shapes_ta"]["ci"]
    assert lo <= ta.mean() <= hi


def test_shapes_reward_on_a_non_shapes_file_fails_before_training(tmp_path):
    tiny_base(tmp_path / "base")
    path = tmp_path / "dogs.jsonl"
    path.write_text('{"prompt": "a circle", "tag": "single_object", "include": [{"class": "circle", "count": 1}]}\n'
                    '{"prompt": "a dog", "tag": "single_object", "include": [{"class": "dog", "count": 1}]}\n')
    with pytest.raises(ValueError, match=r"dogs.jsonl:2: the shapes verifier cannot score 'a dog'.*'dog'"):
        Trainer(small_cfg(tmp_path, data=DataConfig(str(path))), progress=False)
