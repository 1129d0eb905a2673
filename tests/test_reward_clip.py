"""The CLIP reward on a tiny random CLIP that the test builds with transformers and saves to a folder: its scores
equal a direct transformers computation (vision tower → projection, text tower → projection, cosine)."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from unigrpo.rewards.base import score  # noqa: E402
from unigrpo.rewards.registry import RewardSpec, build_reward  # noqa: E402


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    d = tmp_path_factory.mktemp("tiny_clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in map(chr, range(33, 127)):       # single characters only, no merges: a valid, tiny BPE
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, bos_token_id=0,
                                      eos_token_id=1, pad_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).eval().save_pretrained(d)
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(d)
    return str(d)


def test_clip_reward_matches_a_direct_transformers_call(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    g = torch.Generator().manual_seed(1)
    images = torch.rand(5, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red circle", "two squares", "a blue triangle left of a circle", "x", "a green square"]
    fn = build_reward(RewardSpec("clip", path=tiny_clip, batch_size=2))
    got = score(fn, images, prompts, [{}] * 5, label="clip")

    model = CLIPModel.from_pretrained(tiny_clip).eval()
    proc = CLIPProcessor.from_pretrained(tiny_clip)
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    with torch.no_grad():
        want = []
        for i in range(5):
            inp = proc(text=[prompts[i]], images=[pixels[i]], return_tensors="pt", padding=True)
            img = model.visual_projection(model.vision_model(pixel_values=inp["pixel_values"]).pooler_output)
            txt = model.text_projection(model.text_model(input_ids=inp["input_ids"],
                                                         attention_mask=inp["attention_mask"]).pooler_output)
            want.append(torch.nn.functional.cosine_similarity(img, txt).item())
    # float32 towers; batching pads the text differently, which changes nothing under the attention mask
    np.testing.assert_allclose(got.numpy(), np.array(want), rtol=0, atol=1e-5)
    assert got.abs().max() <= 1.0 and len(set(np.round(got.numpy(), 6))) == 5


def test_clip_reward_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        build_reward(RewardSpec("clip", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="cannot load a CLIP"):
        build_reward(RewardSpec("clip", path=str(tmp_path)))
