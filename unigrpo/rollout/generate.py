"""Sampling from the unified model: prompt → reasoning tokens (KV-cached decoding) → image (denoising over
the cached context, which it never changes).

Batches are left-padded so every row decodes into the same cache column; each row keeps its own RoPE
positions. A row that has emitted EOS keeps stepping with its new tokens marked invalid (never attended to,
never counted). A row that reaches `max_new_tokens` without EOS is cut there: its image follows the
truncated reasoning, exactly as the training packer sees it.

Denoising runs the static-shape loop of graphs.py: σ and h per step precomputed on the device, no host
syncs, and on CUDA the step's model evaluation(s) replayed from a CUDA graph (`cuda_graph`, default on).
Text decoding is still the eager loop (one host sync per token: the all-rows-finished check).

Legend: B rows, P prompt tokens (padded), T reasoning tokens (padded), C/h/w latent dims.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from unigrpo.model.unified import KVCache, UnifiedModel
from unigrpo.rollout.graphs import make_velocity, ode_loop, ode_tables


@dataclass
class Reasoning:
    """The text half of a batch of rollouts."""

    prompt_ids: list[list[int]]  # per row, unpadded
    tokens_BT: torch.Tensor  # long, reasoning tokens (pad where mask is False)
    logp_BT: torch.Tensor  # float32, log-prob of each token under the sampling policy (0 where masked)
    mask_BT: torch.Tensor  # bool, real (sampled) tokens
    texts: list[str]  # decoded reasoning, specials dropped
    cache: KVCache  # prompt + reasoning context, ready for denoising

    def reasoning_ids(self, i: int) -> list[int]:
        return self.tokens_BT[i][self.mask_BT[i]].tolist()


def encode_prompts(tokenizer, prompts: list[str], max_len: int, what: str = "prompt") -> list[list[int]]:
    """Token ids of each prompt; a prompt that leaves no room for reasoning is an error naming it."""
    out = []
    for p in prompts:
        ids = tokenizer.encode_prompt(p)
        if len(ids) >= max_len:
            raise ValueError(f"{what} {p[:60]!r} is {len(ids)} tokens; the model's context holds "
                             f"max_text_len={max_len} text tokens including the reasoning")
        out.append(ids)
    return out


def left_padded(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(long [B, P] tokens, bool [B, P] valid): each row's ids at the right end, pad_id before them."""
    B, P = len(ids), max(len(x) for x in ids)
    tok = torch.full((B, P), pad_id, dtype=torch.long)
    valid = torch.zeros(B, P, dtype=torch.bool)
    for i, x in enumerate(ids):
        tok[i, P - len(x):] = torch.tensor(x)
        valid[i, P - len(x):] = True
    return tok, valid


def _prefill(model: UnifiedModel, tokenizer, ids: list[list[int]], capacity_extra: int):
    B = len(ids)
    dev = model.embed.weight.device
    tok, valid = left_padded(ids, tokenizer.pad_id)
    cache = model.new_cache(B, tok.shape[1] + capacity_extra)
    hidden = model.append_text(cache, tok.to(dev), valid.to(dev))
    return cache, hidden[:, -1]


@torch.no_grad()
def generate_reasoning(model: UnifiedModel, tokenizer, prompts: list[str], *, temperature: float = 1.0,
                       max_new_tokens: int | None = None, generator: torch.Generator | None = None,
                       extra_capacity: int = 0) -> Reasoning:
    """Sample reasoning for each prompt until EOS (temperature 0 = greedy). `extra_capacity` reserves cache
    columns for image blocks (and later rounds) appended afterwards."""
    cfg = model.cfg
    ids = encode_prompts(tokenizer, prompts, cfg.max_text_len)
    T = reasoning_budget(cfg.max_text_len, ids, max_new_tokens)
    cache, last = _prefill(model, tokenizer, ids, T + extra_capacity)
    return _decode(model, tokenizer, cache, last, ids, T, temperature, generator)


def reasoning_budget(max_text_len: int, ids: list[list[int]], max_new_tokens: int | None) -> int:
    """Reasoning tokens a round may sample after its context `ids` (per row): the room left in the model's
    text context by the longest one, capped at max_new_tokens."""
    room = max_text_len - max(len(x) for x in ids)
    return room if max_new_tokens is None else min(max_new_tokens, room)


def _decode(model: UnifiedModel, tokenizer, cache: KVCache, last, ids, T: int, temperature: float,
            generator) -> Reasoning:
    """Up to T decoding steps after the cache (`last`: the hidden state predicting the first token)."""
    B, dev = last.shape[0], last.device
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    tokens, logps, masks = [], [], []
    for _ in range(T):
        logp_all = torch.log_softmax(model.logits(last).float() / max(temperature, 1e-8), dim=-1)
        if temperature > 0:
            nxt = torch.multinomial(logp_all.exp(), 1, generator=generator).squeeze(1)
        else:
            nxt = logp_all.argmax(-1)
        active = ~done
        nxt = torch.where(active, nxt, torch.full_like(nxt, tokenizer.pad_id))
        tokens.append(nxt)
        logps.append(torch.where(active, logp_all.gather(1, nxt[:, None]).squeeze(1), 0.0))
        masks.append(active)
        last = model.append_text(cache, nxt[:, None], active[:, None])[:, 0]
        done = done | (nxt == tokenizer.eos_id)
        if bool(done.all()):
            break
    if tokens:
        tokens_BT, logp_BT, mask_BT = (torch.stack(x, 1) for x in (tokens, logps, masks))
    else:
        tokens_BT = torch.zeros(B, 0, dtype=torch.long, device=dev)
        logp_BT, mask_BT = tokens_BT.float(), tokens_BT.bool()
    texts = [tokenizer.decode(tokens_BT[i][mask_BT[i]].tolist()) for i in range(B)]
    return Reasoning(ids, tokens_BT, logp_BT, mask_BT, texts, cache)


def encode_instructions(tokenizer, instructions: list[str], max_len: int) -> list[list[int]]:
    """Token ids of a later round's instructions c^r (ALGORITHM.md §12): encoded like a prompt, [bos] text
    [sor], and each round's text (instruction + reasoning) holds max_len tokens."""
    return encode_prompts(tokenizer, instructions, max_len, what="instruction")


def round_capacity(model: UnifiedModel, instruction_ids: list[list[list[int]]], max_new_tokens: int | None) -> int:
    """Cache columns that rounds 2..R need after round 1: per round, the clean image block of the round
    before, the (left-padded) instructions and the reasoning budget. instruction_ids[r][i]: round r+2, row i."""
    n = 0
    for ids in instruction_ids:
        n += model.cfg.image_tokens + max(len(x) for x in ids) + reasoning_budget(model.cfg.max_text_len, ids,
                                                                                 max_new_tokens)
    return n


@torch.no_grad()
def next_round(model: UnifiedModel, tokenizer, cache: KVCache, image_latents, ids: list[list[int]], *,
               temperature: float, max_new_tokens: int | None, generator) -> Reasoning:
    """Round r ≥ 2 after round r−1 (ALGORITHM.md §12): append x̄^{r−1} as a clean block (σ = 0), then the
    instructions `ids` (one per row, left-padded inside the appended chunk so every row's last column is
    real), then sample the round's reasoning. The returned Reasoning's prompt_ids are the instructions."""
    last = append_round(model, tokenizer, cache, image_latents, ids)
    T = reasoning_budget(model.cfg.max_text_len, ids, max_new_tokens)
    return _decode(model, tokenizer, cache, last, ids, T, temperature, generator)


def append_round(model: UnifiedModel, tokenizer, cache: KVCache, image_latents, ids: list[list[int]]):
    """Append x̄^{r−1} (float [B, C, h, w]) as a clean block, then the round's text `ids` left-padded inside the
    chunk; returns the hidden state [B, d] of each row's last column."""
    dev = image_latents.device
    model.append_image(cache, image_latents, torch.zeros(image_latents.shape[0], device=dev))
    tok, valid = left_padded(ids, tokenizer.pad_id)
    return model.append_text(cache, tok.to(dev), valid.to(dev))[:, -1]


def with_reasoning(tokenizer, ids: list[list[int]], reasoning: list[str], max_len: int) -> list[list[int]]:
    """Each row's context ids followed by given (not sampled) reasoning + [eos]; an error names a text that
    makes the round's text longer than max_len tokens, or a count that differs from the rows'."""
    if len(reasoning) != len(ids):
        raise ValueError(f"{len(reasoning)} reasoning texts for {len(ids)} prompts")
    out = [x + tokenizer.encode_reasoning(t) for x, t in zip(ids, reasoning)]
    too_long = [t for t, x in zip(reasoning, out) if len(x) > max_len]
    if too_long:
        raise ValueError(f"reasoning {too_long[0][:60]!r} makes the context longer than "
                         f"max_text_len={max_len} tokens")
    return out


@torch.no_grad()
def prefill_given(model: UnifiedModel, tokenizer, prompts: list[str], reasoning: list[str],
                  extra_capacity: int = 0) -> KVCache:
    """The cache of each prompt followed by given reasoning (round 1 without sampling), with `extra_capacity`
    columns left for what is appended after it."""
    L = model.cfg.max_text_len
    ids = with_reasoning(tokenizer, encode_prompts(tokenizer, prompts, L), reasoning, L)
    return _prefill(model, tokenizer, ids, extra_capacity)[0]


@torch.no_grad()
def unconditional_cache(model: UnifiedModel, tokenizer, batch: int) -> KVCache:
    """The context classifier-free guidance contrasts with: an empty prompt and empty reasoning."""
    ids = tokenizer.encode_prompt("") + tokenizer.encode_reasoning("")
    cache, _ = _prefill(model, tokenizer, [ids] * batch, 0)
    return cache


@torch.no_grad()
def denoise(model: UnifiedModel, cache: KVCache, *, num_steps: int, shift: float = 3.0,
            cfg_scale: float = 1.0, uncond_cache: KVCache | None = None, generator=None,
            noise_BChw: torch.Tensor | None = None, cuda_graph: bool = True) -> torch.Tensor:
    """Deterministic (ODE, Euler) denoising from pure noise to a clean latent, float32 [B, C, h, w].
    With cfg_scale ≠ 1, v = v_u + w·(v_c − v_u) with the unconditional cache (two evaluations per step).
    cuda_graph: on CUDA, replay the step's evaluation(s) from a CUDA graph (graphs.py; same numbers)."""
    cfg = model.cfg
    B = cache.valid.shape[0]
    dev = model.embed.weight.device
    shape = (B, cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    x = torch.randn(shape, generator=generator, device=dev) if noise_BChw is None else noise_BChw.float()
    velocity = make_velocity(model, cache, uncond_cache=uncond_cache, cfg_scale=cfg_scale, cuda_graph=cuda_graph)
    return ode_loop(velocity, x, ode_tables(num_steps, shift, B, dev))


@torch.no_grad()
def sample(model: UnifiedModel, tokenizer, codec, prompts: list[str], *, temperature: float = 1.0,
           num_steps: int = 50, shift: float = 3.0, cfg_scale: float = 1.0, generator=None,
           cuda_graph: bool = True, reasoning: list[str] | None = None):
    """Prompts → (reasoning texts, images [B, 3, H, W] in [-1, 1]) on the evaluation (ODE) path. With
    `reasoning` (one text per prompt) the image is conditioned on that text instead of sampled reasoning."""
    if reasoning is None:
        r = generate_reasoning(model, tokenizer, prompts, temperature=temperature, generator=generator)
        texts, cache = r.texts, r.cache
    else:
        texts, cache = list(reasoning), prefill_given(model, tokenizer, prompts, reasoning)
    uncond = unconditional_cache(model, tokenizer, len(prompts)) if cfg_scale != 1.0 else None
    latents = denoise(model, cache, num_steps=num_steps, shift=shift, cfg_scale=cfg_scale,
                      uncond_cache=uncond, generator=generator, cuda_graph=cuda_graph)
    return texts, codec.decode(latents)


def check_instructions(instructions: list[list[str]], prompts: int) -> int:
    """Rounds R of a batch whose rows carry `instructions` (R − 1 each): every row the same number."""
    if len(instructions) != prompts:
        raise ValueError(f"{len(instructions)} instruction lists for {prompts} prompts")
    counts = {len(x) for x in instructions}
    if len(counts) != 1:
        raise ValueError(f"every episode of a batch needs the same number of rounds; got instruction counts "
                         f"{sorted(counts)}")
    return 1 + counts.pop()


@torch.no_grad()
def sample_episode(model: UnifiedModel, tokenizer, codec, prompts: list[str], instructions: list[list[str]], *,
                   temperature: float = 1.0, num_steps: int = 50, shift: float = 3.0, cfg_scale: float = 1.0,
                   generator=None, cuda_graph: bool = True, reasoning: list[list[str]] | None = None):
    """Multi-round sampling on the evaluation (ODE) path (ALGORITHM.md §12): prompt → reasoning¹ → x¹, then per
    later round its instruction → reasoning^r → x^r conditioned on the whole history, x̄^{r−1} as a clean
    block. instructions[i]: the R − 1 instructions of prompt i. With cfg_scale ≠ 1 the unconditional branch is
    the empty context (text guidance). With `reasoning` ([R][B] texts) every round's image is conditioned on
    the given text instead of sampled reasoning. Returns (texts [R][B], images [R] × [B, 3, H, W] in [-1, 1])."""
    R = check_instructions(instructions, len(prompts))
    if reasoning is not None and len(reasoning) != R:
        raise ValueError(f"reasoning for {len(reasoning)} rounds, but these episodes have R={R}")
    L = model.cfg.max_text_len
    later = [encode_instructions(tokenizer, [x[r] for x in instructions], L) for r in range(R - 1)]
    extra = round_capacity(model, later, None)
    if reasoning is None:
        rs = generate_reasoning(model, tokenizer, prompts, temperature=temperature, generator=generator,
                                extra_capacity=extra)
        cache, texts = rs.cache, [rs.texts]
    else:   # given text fits each round's budget, so round_capacity's room holds it
        cache, texts = prefill_given(model, tokenizer, prompts, reasoning[0], extra), [list(reasoning[0])]
    uncond = unconditional_cache(model, tokenizer, len(prompts)) if cfg_scale != 1.0 else None
    images = []
    for r in range(R):
        latents = denoise(model, cache, num_steps=num_steps, shift=shift, cfg_scale=cfg_scale,
                          uncond_cache=uncond, generator=generator, cuda_graph=cuda_graph)
        images.append(codec.decode(latents))
        if r == R - 1:
            break
        if reasoning is None:
            rs = next_round(model, tokenizer, cache, latents, later[r], temperature=temperature,
                            max_new_tokens=None, generator=generator)
            texts.append(rs.texts)
        else:
            append_round(model, tokenizer, cache, latents, with_reasoning(tokenizer, later[r], reasoning[r + 1], L))
            texts.append(list(reasoning[r + 1]))
    return texts, images
