"""Multi-round episodes (ALGORITHM.md §12) end to end: the rollout's rounds, the packed training forward of
real rollout trajectories against the round-by-round cached forwards, the data that carries rounds, and one
trainer iteration that scores the chosen rounds."""
import json
import os

import numpy as np
import pytest
import torch

from test_trainer import small_cfg, tiny_base
from unigrpo.data import (DataConfig, PromptFileError, build_prompt_source, check_rounds, episode_rounds,
                          instructions_of, load_prompt_file)
from unigrpo.losses.forward import PackedForward, scatter_tokens
from unigrpo.losses.packing import pack
from unigrpo.model import preset
from unigrpo.model.build import build_bundle
from unigrpo.rewards.registry import RewardSpec
from unigrpo.rewards.verifier import records_to_prompts
from unigrpo.rollout.rollout import RolloutConfig, rollout, rollout_in_batches
from unigrpo.train_config import EditConfig
from unigrpo.trainer import Trainer
from unigrpo_kernels import sigma_schedule

@pytest.mark.parametrize("backend", ["sdpa", "split"])
def test_history_blocks_held_fixed_get_no_gradient_and_keep_their_values(backend):
    """context_grad=False (edit.history_grad false): the forward's values are bit-identical, the text loss no
    longer reaches the image expert through x̄¹, and the round-2 velocities' gradient on the image expert is
    what remains once the clean block's own path is cut (it differs from the full gradient)."""
    b = _model()
    traj, _ = _episodes(b, 2, CFG)
    batch = pack(traj, [0, 3], sigma_schedule(CFG.steps, CFG.shift), b.model.cfg.image_tokens, b.tokenizer.pad_id)
    image = [p for n, p in b.model.named_parameters() if "experts.1." in n]
    assert image
    out = {}
    for grad in (True, False):
        hidden, v = b.model.forward_packed(batch.layout, batch.ids_BS, batch.latents_M, batch.sigma_M,
                                           backend=backend, context_grad=grad)
        text = hidden.reshape(-1, hidden.shape[-1])[batch.text_pos].square().sum()
        g_text = torch.autograd.grad(text, image, allow_unused=True, retain_graph=True)
        g_v = torch.autograd.grad(batch.noise_velocities(v).square().sum(), image, allow_unused=True)
        out[grad] = (hidden.detach(), v.detach(), g_text, g_v)
    assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
    norm = lambda gs: sum(0.0 if g is None else g.norm().item() for g in gs)   # noqa: E731
    assert norm(out[True][2]) > 1e-6 and norm(out[False][2]) == 0.0
    assert norm(out[False][3]) > 1e-6 and abs(norm(out[True][3]) - norm(out[False][3])) > 1e-9


PROMPTS = ["a red circle", "two squares"]
INSTRUCTIONS = [["make the circle blue", "add a triangle"], ["remove the square", "move it"]]


def _model(dtype=torch.float64, max_text_len=48):
    torch.manual_seed(0)
    b = build_bundle(preset("tiny", hidden=32, heads=2, kv_heads=1, intermediate=64, layers=2,
                            max_text_len=max_text_len))
    torch.nn.init.normal_(b.model.image_out.weight, std=0.05)   # velocities that depend on the context
    b.model.to(dtype).eval()
    return b


def _forward(b):
    return PackedForward(temperature=1.0, cfg_scale=1.0, uncond_ids=[], image_tokens=b.model.cfg.image_tokens,
                         pad_id=b.tokenizer.pad_id, attn_backend="sdpa", text_backend="torch")


def _episodes(b, rounds: int, cfg: RolloutConfig, seed=0):
    windows = np.array([[0, 3, 1][:rounds], [2, 1, 3][:rounds]])
    ins = [x[:rounds - 1] for x in INSTRUCTIONS]
    return rollout(b.model, b.tokenizer, PROMPTS, cfg, generator=torch.Generator().manual_seed(seed),
                   windows=windows, instructions=ins), windows


CFG = RolloutConfig(group_size=2, steps=6, window_size=2, window_hi=5, max_new_tokens=8, eta=0.7)


@pytest.mark.parametrize("rounds", [2, 3])
def test_packed_forward_of_rollout_episodes_equals_the_cached_rounds_float64(rounds):
    """Every round's window velocities and reasoning log-probs from ONE packed forward per trajectory equal
    those of the cached path run round by round (prefix, x̄^r appended clean at σ = 0, the next instruction,
    its reasoning). Float64: agreement to 1e-10 is rounding of ~10³ operations, any wrong visibility or RoPE
    position moves values by > 1e-3 with this model's 0.05-scale output layer."""
    b = _model()
    m, tok = b.model, b.tokenizer
    traj, windows = _episodes(b, rounds, CFG)
    ep, rs = traj.episode, traj.reasoning
    R, W = traj.x_RW.shape[:2]
    assert ep.rounds == rounds and W == rounds * CFG.window_size
    assert torch.equal(traj.window_k0.cpu(), torch.as_tensor(windows).repeat_interleave(2, 0))
    sig = sigma_schedule(CFG.steps, CFG.shift)
    batch = pack(traj, list(range(R)), sig, m.cfg.image_tokens, tok.pad_id)
    assert len(batch.layout.block_starts) == R * (rounds * CFG.window_size + rounds - 1)
    with torch.no_grad():
        (lp, _), v = _forward(b)(m, batch, with_entropy=True)
        lp_RT = scatter_tokens(lp, batch, R, rs.tokens_BT.shape[1])
        lengths = ep.reasoning_lengths(rs.mask_BT)
        for r in range(R):
            cache = m.new_cache(1, 512)
            ctx = [rs.prompt_ids[r]] + ep.instruction_ids[r]
            for k in range(rounds):
                if k:
                    m.append_image(cache, ep.latents_RK[r, k - 1][None].double(), torch.zeros(1))
                o = rs.tokens_BT[r, ep.columns[k]:ep.columns[k] + int(lengths[r, k])].tolist()
                hidden = m.append_text(cache, torch.tensor([ctx[k] + o]))
                logp = torch.log_softmax(m.logits(hidden[0]).double(), -1)
                want = logp[len(ctx[k]) - 1:-1].gather(1, torch.tensor(o)[:, None]).squeeze(1)
                got = lp_RT[r, ep.columns[k]:ep.columns[k] + len(o)]
                torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
                for j in range(CFG.window_size):
                    slot = k * CFG.window_size + j
                    s = sig[traj.window_steps[r, slot]].float().reshape(1)   # σ enters as float32, as in the rollout
                    v_c = m.image_velocity(cache, traj.x_RW[r, slot][None].double(), s)
                    torch.testing.assert_close(v.view(R, W, *v.shape[1:])[r, slot], v_c[0], atol=1e-10, rtol=0)


def test_given_reasoning_rebuilds_the_cache_that_sampling_built():
    """sample_episode(reasoning=...) conditions each round on given text exactly as on sampled text: greedy
    reasoning kept to printable ASCII (so decode → encode gives the sampled ids back; greedy draws nothing from
    the generator, so the noise is the same) forced back in gives every round's image again. Float64, 1e-9:
    one prefill against token-by-token appends differ only by rounding; a wrong position or mask moves the
    image by > 1e-3 with this model's 0.05-scale output layer. Other round-2 text moves x² only. (Every text
    must have ended with [eos]: text cut at the budget has none, and given text always gets one.)"""
    from unigrpo.rollout.generate import encode_prompts, sample_episode

    b = _model(max_text_len=64)
    m, tok = b.model, b.tokenizer
    allowed = torch.full((m.cfg.vocab_size,), float("-inf"), dtype=torch.float64)
    allowed[32:127] = 0.0
    logits = m.logits

    def ascii_until_digit(h):   # [eos] exactly where greedy decoding would write a digit
        lg = logits(h) + allowed
        digit = lg[..., 48:58].amax(-1) >= lg.amax(-1)
        lg[..., tok.eos_id] = torch.where(digit, 1e9, float("-inf"))
        return lg

    m.logits = ascii_until_digit
    ins = [x[:1] for x in INSTRUCTIONS]

    def run(reasoning=None):
        return sample_episode(m, tok, b.codec, PROMPTS, ins, temperature=0.0, num_steps=3,
                              generator=torch.Generator().manual_seed(0), reasoning=reasoning)

    texts, images = run()
    assert len({len(t) for r in texts for t in r}) > 1 and all(t for r in texts for t in r)
    for ids, r in zip([encode_prompts(tok, PROMPTS, 64), [tok.encode_prompt(x[0]) for x in ins]], texts):
        assert max(len(t) for t in r) < 64 - max(len(x) for x in ids)   # each stopped at [eos] inside its budget
    again, forced = run(texts)
    assert again == texts
    for x, y in zip(images, forced):
        torch.testing.assert_close(y, x, atol=1e-9, rtol=0)
    _, other = run([texts[0], ["a blue circle at (8, 8)", texts[1][1]]])
    assert torch.equal(other[0], images[0])
    assert (other[1][0] - images[1][0]).abs().max() > 1e-3 and torch.equal(other[1][1], images[1][1])
    with pytest.raises(ValueError, match="reasoning for 1 rounds, but these episodes have R=2"):
        run(texts[:1])
    with pytest.raises(ValueError, match="makes the context longer than max_text_len=64"):
        run([texts[0], ["x" * 50, texts[1][1]]])


def test_round_two_sees_round_one_image_and_round_one_does_not_see_round_two():
    """Changing x̄¹ moves round 2's velocities and leaves round 1's bit for bit (the interleaved order)."""
    b = _model()
    traj, _ = _episodes(b, 2, CFG)
    sig = sigma_schedule(CFG.steps, CFG.shift)
    fw = _forward(b)
    with torch.no_grad():
        v0 = fw.velocities(b.model, pack(traj, [0, 3], sig, b.model.cfg.image_tokens, b.tokenizer.pad_id))
        traj.episode.latents_RK[:, 0] += 0.5
        v1 = fw.velocities(b.model, pack(traj, [0, 3], sig, b.model.cfg.image_tokens, b.tokenizer.pad_id))
    v0, v1 = v0.view(2, 4, -1), v1.view(2, 4, -1)
    assert torch.equal(v0[:, :2], v1[:, :2])
    assert (v0[:, 2:] - v1[:, 2:]).abs().max() > 1e-3


def test_episodes_rolled_out_in_pieces_pack_like_their_rollout():
    """rollout_in_batches pads each round's columns on its own: the training path's recomputed log-probs match
    what the rollout sampled with (float32: 1e-4 as test_trainer's on-policy check)."""
    b = _model(torch.float32)
    # no token cap: each piece's round widths are its context's room, so the pieces' columns differ
    cfg = RolloutConfig(group_size=4, steps=6, window_size=2, window_hi=5, max_new_tokens=0, eta=0.7)
    traj = rollout_in_batches(b.model, b.tokenizer, PROMPTS, cfg, batch=2, generator=torch.Generator().manual_seed(1),
                              windows=np.array([[0, 3], [2, 1]]), instructions=[x[:1] for x in INSTRUCTIONS])
    R = traj.x_RW.shape[0]
    assert R == 8 and traj.episode.latents_RK.shape[:2] == (8, 2)
    assert traj.episode.columns == [0, 35, 64]   # each round padded to its widest piece: 34 | 35, 26 | 29
    batch = pack(traj, list(range(R)), sigma_schedule(6, 3.0), b.model.cfg.image_tokens, b.tokenizer.pad_id)
    with torch.no_grad():
        (lp, _), _ = _forward(b)(b.model, batch, with_entropy=True)
    rs = traj.reasoning
    lp_RT = scatter_tokens(lp, batch, R, rs.tokens_BT.shape[1])
    assert int(rs.mask_BT.sum()) == lp.numel()
    torch.testing.assert_close(lp_RT[rs.mask_BT], rs.logp_BT[rs.mask_BT], atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ data
def test_shapes_edit_records_carry_both_rounds_and_score_against_the_target():
    src = build_prompt_source("shapes_edit", "train", 0)
    assert check_rounds(src.records) == 2
    kinds = {r.tag for r in src.records}
    assert kinds == {"recolour", "move", "add", "remove"}
    for rec in src.records[:40]:
        first, second = episode_rounds(rec)
        assert first is rec and second.text != rec.text and len(instructions_of(rec)) == 1
        assert records_to_prompts([second])[0].text == second.text   # the round-2 target is a world prompt


def test_episode_records_from_a_file_and_their_errors(tmp_path):
    path = tmp_path / "p.jsonl"
    good = {"prompt": "a cat", "rounds": [{"instruction": "make it black", "prompt": "a black cat", "k": 1}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "rounds": good["rounds"] * 2}) + "\n")
    recs = load_prompt_file(str(path))
    assert episode_rounds(recs[0])[1].metadata == {"k": 1}
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: 3 rounds, but .*p.jsonl:1 has 2"):
        check_rounds(recs)
    path.write_text(json.dumps({"prompt": "a cat", "rounds": [{"prompt": "a dog"}]}) + "\n")
    with pytest.raises(PromptFileError, match=r"p.jsonl:1: rounds\[0\]: 'instruction' must be a non-empty string"):
        episode_rounds(load_prompt_file(str(path))[0])


@pytest.mark.parametrize("weights, pattern", [([-1.0, 1.0], "weights >= 0"), ([0.0, 0.0], "not all 0")])
def test_bad_round_weights_are_refused(weights, pattern):
    with pytest.raises(ValueError, match=pattern):
        EditConfig(weights)


# ------------------------------------------------------------------------------------------------ trainer
def _brightness(images, prompts, metadata):
    """A reward with signal for an untrained model: mean brightness, in [-1, 1]."""
    return images.float().mean((1, 2, 3))


def _round_mark(images, prompts, metadata):
    """1 when the prompt is a round-2 target (its text starts with "a black"), else 0."""
    return torch.tensor([float(p.startswith("a black")) for p in prompts])


def test_one_episode_iteration_trains_every_round_on_policy(tmp_path):
    tiny_base(tmp_path / "base")
    cfg = small_cfg(tmp_path, iterations=1, data=DataConfig(train="shapes_edit", eval="shapes_edit"),
                    rewards=[RewardSpec("python", function=f"{__name__}:_brightness")])
    tr = Trainer(cfg, progress=False)
    assert tr.rounds == 2 and tr.round_weights == [0.0, 1.0]
    m = tr.iteration()
    assert m["reasoning/length_round1"] > 0 and m["reasoning/length_round2"] > 0
    assert "reward/round2/python" in m and "reward/round1/python" not in m
    assert m["mismatch/text_logp_max"] < 1e-4 and m["mismatch/flow_logp_max"] < 1e-3
    assert m["grad_norm/text"] > 0 and m["grad_norm/image"] > 0


def test_round_weights_score_the_chosen_rounds_against_their_own_targets(tmp_path):
    tiny_base(tmp_path / "base")
    path = tmp_path / "ep.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "rounds": [{"instruction": "make it black",
                                                                "prompt": "a black cat"}]}) + "\n")
    spec = RewardSpec("python", function=f"{__name__}:_round_mark")
    for weights, want in (([], 1.0), ([1.0, 0.0], 0.0), ([0.25, 2.0], 2.0)):
        cfg = small_cfg(tmp_path, iterations=1, data=DataConfig(train=str(path), eval=str(path)), rewards=[spec],
                        edit=EditConfig(weights), out=str(tmp_path / f"run{len(weights)}{weights[:1]}"))
        tr = Trainer(cfg, progress=False)
        traj = rollout(tr.policy, tr.bundle.tokenizer, ["a cat"], cfg.rollout, generator=tr.gen,
                       windows=[[0, 1]], instructions=[["make it black"]])
        reward, _, _ = tr.episode_rewards(traj, tr.source.records * cfg.rollout.group_size)
        assert torch.allclose(reward, torch.full_like(reward, want))


# ------------------------------------------------------------------------------------------------ pre-training
def test_pretrain_episodes_teach_the_edited_plan_and_condition_on_the_clean_first_image():
    """An episode example's targets are round 1's plan and round 2's edited plan (exact for the task), its
    clean block is round 1's image at σ = 0 (the x0 that round 1's noise blocks were made from), and the
    loss's noise blocks are every block but that one."""
    from unigrpo.pretrain import PretrainConfig, make_batch
    from unigrpo.world import make_edit_tasks, make_prompts, parse_plan, verify_edit_plan
    b = build_bundle(preset("tiny"))
    tok, W = b.tokenizer, 2
    tasks = make_edit_tasks("train", 8, seed=3)
    prompts = make_prompts("train", 8, seed=3)
    mixed = [t if i % 2 else None for i, t in enumerate(tasks)]
    layout, ids, tgt, lat, sig, v_tgt, noise = make_batch(b, prompts, np.random.default_rng(0),
                                                          PretrainConfig(blocks_per_sample=W, p_uncond=0.0),
                                                          torch.Generator().manual_seed(0), mixed)
    assert len(layout.block_kinds) == 4 * W + 4 * (2 * W + 1) and len(noise) == v_tgt.shape[0] == 4 * W + 4 * 2 * W
    full = [m for m in range(len(layout.block_kinds)) if m not in set(noise.tolist())]
    assert torch.all(sig[full] == 0)
    x0 = lat[noise] - sig[noise][:, None, None, None] * v_tgt   # x_σ = (1−σ)·x0 + σ·ε and v = ε − x0
    for e, m in enumerate(full):   # episode e is example 2e+1: its round-1 blocks come right before its clean one
        torch.testing.assert_close(x0[list(noise).index(m - W):list(noise).index(m - 1) + 1],
                                   lat[m][None].expand(W, *lat.shape[1:]), atol=1e-5, rtol=0)
    for i, task in enumerate(mixed):
        text = tok.decode(tgt[i][tgt[i] >= 0].tolist())
        if task is None:
            assert parse_plan(text) is not None
            continue
        eos = [j for j, t in enumerate(tgt[i].tolist()) if t == tok.eos_id]
        assert len(eos) == 2   # two reasoning targets, each ending in EOS
        second = tok.decode([t for t in tgt[i, eos[0] + 1:eos[1]].tolist() if t >= 0])
        assert verify_edit_plan([second], [task]).item() == 1.0, (task.instruction, second)


def test_pretrain_from_a_checkpoint_with_episodes_writes_a_base(tmp_path):
    from unigrpo.pretrain import PretrainConfig, run_pretrain
    from unigrpo.checkpoint import load_checkpoint
    b = tiny_base(tmp_path / "init")
    cfg = PretrainConfig(init=str(tmp_path / "init"), out=str(tmp_path / "base"), steps=2, batch=4,
                         blocks_per_sample=2, edit_fraction=1.0, warmup=1, eval_samples=0, log_every=1)
    run_pretrain(cfg, progress=False)
    ck = load_checkpoint(str(tmp_path / "base"))
    assert ck.config["model"]["hidden"] == b.model.cfg.hidden   # the init's shape, not the preset's
    changed = [k for k, v in b.model.state_dict().items() if not torch.equal(v, ck.model_state[k])]
    assert changed


def test_grid_keeps_an_episode_pair_side_by_side(tmp_path):
    """An x¹ | x² pair (twice as wide as high) is scaled as one, not squeezed into a square tile: the tile's
    left half is x¹ and its right half x²."""
    from PIL import Image

    from unigrpo.viz import save_image_grid

    pair = np.zeros((1, 8, 16, 3), np.uint8)
    pair[0, :, :8, 0] = 255   # x¹ red
    pair[0, :, 8:, 2] = 255   # x² blue
    path = save_image_grid(pair, ["p"], str(tmp_path / "g.png"), ncol=1, tile=32)
    im = np.asarray(Image.open(path).convert("RGB"))
    pad = 4
    assert im.shape[1] == 64 + 2 * pad
    left, right = im[pad:pad + 32, pad:pad + 32], im[pad:pad + 32, pad + 32:pad + 64]
    assert (left == [255, 0, 0]).all() and (right == [0, 0, 255]).all()


def test_eval_grid_frames_tell_strict_from_geneval_only(tmp_path):
    """The eval grid's frames: green where strict passes, amber where only GenEval-style passes (an extra
    object), red where both fail; each colour is read back from its tile's top-left frame pixel."""
    from PIL import Image

    from unigrpo.evaluate import EvalResult, write_eval
    from unigrpo.viz import FRAME_COLORS

    n = 3
    res = EvalResult(categories=["single_object"] * n, ta=np.array([1.0, 0.5, 0.0]),
                     geneval=np.array([1.0, 1.0, 0.0]), prompts=["a circle"] * n, reasoning=["r"] * n,
                     images=np.zeros((n, 8, 8, 3), np.uint8), summary={}, strict=np.array([1.0, 0.0, 0.0]))
    paths = write_eval(res, str(tmp_path), grid=n)
    im = np.asarray(Image.open(paths["grid"]).convert("RGB"))
    cell_h = im.shape[0] // n   # one tag, so one column: a row per sample
    assert [tuple(int(v) for v in im[r * cell_h, 0]) for r in range(n)] == [FRAME_COLORS[k] for k in (2, 1, 0)]


@pytest.mark.parametrize("source, first_init", [("runs/tiny/base", ""), ("runs/tiny/edit_base", "shipped")])
def test_a_shipped_base_is_pretrained_in_its_recorded_stages(tmp_path, monkeypatch, source, first_init):
    """With no base to copy, `ensure_base(pretrain=True)` runs the shipped base's bundled stages in order (the
    plain base's, or the editing base's), the second continuing from the first's checkpoint; and those configs
    are the recipe recorded in the shipped base's config.json (all but the paths and the CPU thread count).
    Each stage really runs, cut to 2 steps of 2 examples."""
    import unigrpo.pretrain as pt
    from unigrpo.config import config_to_dict

    monkeypatch.chdir(tmp_path)
    ran, real = [], pt.run_pretrain

    def short(cfg, progress=True):
        ran.append(config_to_dict(cfg))
        cfg.steps, cfg.batch = 2, 2
        return real(cfg, progress=False)

    monkeypatch.setattr(pt, "run_pretrain", short)
    assert pt.ensure_base("b", pretrain=True, source=source) == "pretrained"
    assert [(r["init"], r["out"]) for r in ran] == [(first_init, "b"), ("b", "b")]
    assert os.path.exists("b/model.safetensors")
    recorded = json.load(open(os.path.join(pt.SHIPPED_BASES[source], "config.json")))["pretrain_stages"]
    paths = ("init", "out", "eval_samples", "threads")
    assert len(recorded) == len(ran)
    for stage, r in zip(recorded, ran):
        assert not {k: (v, r[k]) for k, v in stage.items() if k not in paths and r[k] != v}


def test_the_editing_base_is_shipped_and_found_where_the_edit_configs_look(tmp_path, monkeypatch):
    """`ensure_base` copies what `source` stands for: the source checkpoint itself, else for the bundled
    editing config's default path the shipped editing base; an unknown empty source is an error naming it."""
    from unigrpo.model.build import load_bundle
    from unigrpo.pretrain import SHIPPED_EDIT_BASE, ensure_base

    monkeypatch.chdir(tmp_path)
    assert ensure_base("cmp/base", source="runs/tiny/edit_base") == "copied"
    shipped = open(os.path.join(SHIPPED_EDIT_BASE, "model.safetensors"), "rb").read()
    assert open("cmp/base/model.safetensors", "rb").read() == shipped
    assert load_bundle("cmp/base").model.cfg.image_tokens > 0
    assert ensure_base("cmp/base", source="runs/tiny/edit_base") == "existing"
    assert ensure_base("cmp/other", source="cmp/base") == "copied"
    with pytest.raises(FileNotFoundError, match="no base checkpoint at mine/ckpt"):
        ensure_base("cmp/third", source="mine/ckpt")


def test_the_run_report_shows_both_grids_with_their_legend(tmp_path):
    """report.md embeds the before and after grids that the run's evaluations wrote, with the frame legend,
    and names no grid that is not there."""
    from unigrpo.evaluate import EvalResult, write_eval
    from unigrpo.report import GRID_LEGEND, write_report

    n = 2
    res = EvalResult(categories=["single_object"] * n, ta=np.ones(n), geneval=np.ones(n), prompts=["a circle"] * n,
                     reasoning=["r"] * n, images=np.zeros((n, 8, 8, 3), np.uint8),
                     summary={"overall": {"n": n}}, strict=np.ones(n))
    write_eval(res, str(tmp_path / "eval_base"), grid=n)
    text = open(write_report(str(tmp_path), before=res.summary, after=res.summary, history=[], config={})).read()
    assert "](eval_base/grid.png)" in text and GRID_LEGEND in text
    assert "eval_final/grid.png" not in text


def test_episode_eval_scores_each_rounds_plan_against_that_rounds_target(tmp_path, monkeypatch):
    """`plan_exact_rounds[k]` judges round k's reasoning against round k's target: with the world's exact plan
    for the source prompt written in round 1 and copied unchanged into round 2 (an edit never made), round 1
    is exact and round 2 never is. Every round's reasoning is kept per sample, in eval.json too."""
    import unigrpo.evaluate as ev
    from unigrpo.evaluate import EvalConfig, evaluate, write_eval
    from unigrpo.model.build import load_bundle
    from unigrpo.world import pretrain_example
    from unigrpo.world.prompts import CATEGORIES, all_prompts

    tiny_base(tmp_path / "base")
    by_text = {p.text: p for c in CATEGORIES for p in all_prompts(c)}
    real, rng = ev.sample_episode, np.random.default_rng(0)

    def unedited(model, tok, codec, prompts, instructions, **kw):
        texts, images = real(model, tok, codec, prompts, instructions, **kw)
        plans = [pretrain_example(by_text[p], rng, flaw_prob=0.0)[0] for p in prompts]
        return [plans, plans], images

    monkeypatch.setattr(ev, "sample_episode", unedited)
    res = evaluate(load_bundle(str(tmp_path / "base")), EvalConfig(samples=8, steps=1, batch=4,
                                                                    data=DataConfig(eval="shapes_edit")),
                   progress=False)
    overall = res.summary["overall"]
    assert overall["plan_exact_rounds"] == [1.0, 0.0] and overall["plan_exact"] == 0.0
    assert all(len(r) == 2 and r[1] == t for r, t in zip(res.round_reasoning, res.reasoning))
    assert "(per round: 1: 100.0%, 2: 0.0%)" in ev.format_table(res.summary)
    rows = json.load(open(write_eval(res, str(tmp_path / "ev"), grid=4)["json"]))["samples"]
    assert [r["round_reasoning"] for r in rows] == res.round_reasoning


def test_oracle_episode_eval_gives_each_round_the_worlds_plan_for_its_target(tmp_path):
    """eval.reasoning=oracle on the world's edits: round 1 gets an exact plan of the source and round 2 that
    same layout with the edit applied, so both rounds' plans are exact against their own targets (a random
    model's sampled reasoning is not), and the render of every round-2 plan passes its target strictly."""
    from _images import render_batch
    from unigrpo.evaluate import EvalConfig, evaluate
    from unigrpo.world import parse_plan, verify

    b = _model(torch.float32, max_text_len=96)
    edit = DataConfig(eval="shapes_edit")
    res = evaluate(b, EvalConfig(samples=8, steps=1, batch=4, reasoning="oracle", data=edit), progress=False)
    assert res.summary["overall"]["plan_exact_rounds"] == [1.0, 1.0] and res.summary["overall"]["plan_exact"] == 1.0
    sampled = evaluate(b, EvalConfig(samples=8, steps=1, batch=8, data=edit), progress=False)
    assert sampled.summary["overall"]["plan_exact_rounds"] == [0.0, 0.0]
    records = build_prompt_source("shapes_edit", "eval", 1234).eval_records(8, 1234)
    first, second = ([parse_plan(r[k]) for r in res.round_reasoning] for k in range(2))
    targets = records_to_prompts([episode_rounds(r)[1] for r in records])
    assert verify(render_batch(second), targets).strict.tolist() == [1.0] * 8
    for rec, a, z in zip(records, first, second):   # the edit of round 1's layout, not a fresh layout
        if rec.tag in ("recolour", "remove"):
            assert len({(o.x, o.y) for o in z} - {(o.x, o.y) for o in a}) == 0, (rec.tag, a, z)
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "rounds": [{"instruction": "make it black",
                                                                "prompt": "a black cat"}]}) + "\n")
    with pytest.raises(ValueError, match=r"p.jsonl:1: eval.reasoning='oracle' knows the correct plans of the "
                                         r"shapes world's two-round edits"):
        evaluate(b, EvalConfig(samples=1, steps=1, reasoning="oracle", rewards=["shapes_geneval"],
                               data=DataConfig(eval=str(path))), progress=False)


def test_text_rounds_leaves_the_other_rounds_tokens_out_of_the_text_loss(tmp_path):
    """edit.text_rounds=[2]: round 1's reasoning stays in the packed context but out of L_text, so changing its
    old log-probs does not change the loss, while by default (every round, §12) it does; the normaliser counts
    round 2's tokens only. A round the episodes do not have is refused when the trainer starts."""
    tiny_base(tmp_path / "base")
    data = DataConfig(train="shapes_edit", eval="shapes_edit")
    losses = {}
    for rounds in ([], [2]):
        cfg = small_cfg(tmp_path, iterations=1, data=data, edit=EditConfig(text_rounds=rounds),
                        rewards=[RewardSpec("python", function=f"{__name__}:_brightness")],
                        out=str(tmp_path / f"run{rounds}"))
        cfg.loss.aggregation = "global"
        tr = Trainer(cfg, progress=False)
        traj = rollout(tr.policy, tr.bundle.tokenizer, ["a red circle", "a blue square"], cfg.rollout,
                       generator=torch.Generator().manual_seed(0), windows=[[0, 1], [1, 0]],
                       instructions=[["make the circle green"], ["make the square red"]])
        rows = list(range(traj.x_RW.shape[0]))
        adv = torch.linspace(-1.0, 1.0, len(rows))
        old = tr.objective.prepare(traj, rows, adv, None, tr._balanced_chunks)
        c = traj.episode.columns
        n2 = int(traj.reasoning.mask_BT[:, c[1]:c[2]].sum())
        assert old.text_tokens == (n2 if rounds else int(traj.reasoning.mask_BT.sum()))
        before = tr.objective.loss(old, rows)[0].item()
        old.old_logp[:, c[0]:c[1]] += 0.3   # round 1's ratios move off 1
        losses[tuple(rounds)] = (before, tr.objective.loss(old, rows)[0].item())
    assert losses[(2,)][0] == losses[(2,)][1] and abs(losses[()][0] - losses[()][1]) > 1e-6
    with pytest.raises(ValueError, match=r"edit.text_rounds=\[3\] names round 3; the episodes have 2 rounds"):
        Trainer(small_cfg(tmp_path, data=data, edit=EditConfig(text_rounds=[3])), progress=False)
    with pytest.raises(ValueError, match=r"edit.text_rounds=\[0\]: expected distinct round numbers >= 1"):
        EditConfig(text_rounds=[0])


def test_eval_split_train_scores_the_training_tasks_and_prompts_and_files_refuse_it(tmp_path):
    """eval.split=train draws from what training draws from (the world's training edit tasks / prompt texts); the
    default draws only held-out ones; a prompt file has no splits, so split=train on one is refused."""
    from unigrpo.evaluate import EvalConfig, evaluate
    from unigrpo.world.edit import EDIT_KINDS, split_edits
    from unigrpo.world.prompts import CATEGORIES, split_prompts

    b = _model(torch.float32, max_text_len=96)
    tasks = {s: {f"{t.source.text} > {t.instruction}" for k in EDIT_KINDS for t in split_edits(k, s)}
             for s in ("train", "heldout")}
    for split in ("train", "heldout"):
        res = evaluate(b, EvalConfig(samples=8, steps=1, batch=8, split=split, data=DataConfig(eval="shapes_edit")),
                       progress=False)
        assert set(res.prompts) <= tasks[split] and not set(res.prompts) & tasks[
            "heldout" if split == "train" else "train"], (split, res.prompts)
    train_only = {p.text for c in CATEGORIES for p in split_prompts(c, "train")} - {
        p.text for c in CATEGORIES for p in split_prompts(c, "heldout")}
    res = evaluate(b, EvalConfig(samples=64, steps=1, batch=64, split="train"), progress=False)
    assert set(res.prompts) <= {p.text for c in CATEGORIES for p in split_prompts(c, "train")}
    assert set(res.prompts) & train_only   # not only texts the held-out split shares
    path = tmp_path / "p.txt"
    path.write_text("a cat\n")
    with pytest.raises(ValueError, match=r"eval.split='train' .* data.eval=.*p.txt.* has no splits"):
        EvalConfig(split="train", data=DataConfig(eval=str(path)))
    with pytest.raises(ValueError, match="eval.split"):
        EvalConfig(split="test")
