"""open_clip loading: tiny configs, one-pass embeddings + tokens, weight resolution and its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ltclip.core.errors import LtclipError
from ltclip.models.backbone import load_backbone, resolve_weights
from ltclip.models.text import text_classifier, to_pooled_space

from conftest import TINY_MODEL


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_backbone(TINY_MODEL, "none")


def test_one_pass_gives_open_clip_embedding_and_pre_norm_tokens(tiny):
    x = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        embeds, tokens = tiny.encode(x, tokens=True)
        reference = tiny.model.encode_image(x)
        v = tiny.model.visual
        from_cls = v.ln_post(tokens)[:, 0] @ v.proj
    assert tokens.shape == (5, 1 + (32 // 8) ** 2, 64)
    torch.testing.assert_close(embeds, reference)
    torch.testing.assert_close(from_cls, reference)
    assert tiny.encode_dims() == (32, (17, 64))


def test_pooled_feature_is_ln_post_of_cls_before_the_projection(tiny):
    x = torch.randn(4, 3, 32, 32)
    v = tiny.model.visual
    with torch.inference_mode():
        pooled = tiny.encode_pooled(x)
        _, tokens = tiny.encode(x, tokens=True)
        cls = tokens[:, 0]
        by_hand = (cls - cls.mean(-1, keepdim=True)) / (cls.var(-1, unbiased=False, keepdim=True) + v.ln_post.eps).sqrt()
        by_hand = by_hand * v.ln_post.weight + v.ln_post.bias
        reference = tiny.model.encode_image(x)
    assert pooled.shape == (4, 64) and tiny.pooled_dim == 64
    torch.testing.assert_close(pooled, by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled @ v.proj, reference)


def test_to_pooled_space_maps_normalised_text_back_through_the_projection(tiny):
    text = torch.randn(6, 32)
    proj = tiny.model.visual.proj.detach()
    t = text / text.norm(dim=1, keepdim=True)
    expected = t @ proj.T
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(to_pooled_space(text, proj), expected)


def test_checkpoint_file_loads_its_weights_and_records_sha256(tiny, tmp_path):
    import hashlib

    path = tmp_path / "tiny.pt"
    torch.save(tiny.model.state_dict(), path)
    loaded = load_backbone(TINY_MODEL, str(path))
    assert loaded.identity["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    for (name, a), b in zip(tiny.model.state_dict().items(), loaded.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_openai_tags_get_quick_gelu_and_others_do_not():
    assert resolve_weights("ViT-B-16", "openai")[1]["force_quick_gelu"] is True
    assert resolve_weights("ViT-B-16", "laion2b_s34b_b88k")[1]["force_quick_gelu"] is False
    assert resolve_weights("ViT-B-16", "openai")[2]["quick_gelu"] is True


def test_checkpoint_file_gets_its_tags_preprocessing(tmp_path):
    ckpt = tmp_path / "weights.bin"
    ckpt.write_bytes(b"not read while resolving")
    # ViT-L-14's tags disagree (laion2b_s32b_b82k uses mean 0.5): the user must say which one
    with pytest.raises(LtclipError, match="--preprocess-from TAG"):
        resolve_weights("ViT-L-14", str(ckpt))
    _, kwargs, _ = resolve_weights("ViT-L-14", str(ckpt), preprocess_from="laion2b_s32b_b82k")
    assert kwargs["force_preprocess_cfg"]["mean"] == (0.5, 0.5, 0.5)
    _, kwargs, _ = resolve_weights("ViT-L-14", str(ckpt), preprocess_from="openai")
    assert kwargs["force_quick_gelu"] is True and kwargs["force_preprocess_cfg"]["mean"][0] == pytest.approx(0.48145466)
    with pytest.raises(LtclipError, match="not a tag of ViT-L-14"):
        resolve_weights("ViT-L-14", str(ckpt), preprocess_from="opnai")


def test_unknown_model_and_tag_name_close_matches():
    with pytest.raises(LtclipError, match=r"unknown open_clip model.*ViT-B-16"):
        resolve_weights("ViT-B-61", "openai")
    with pytest.raises(LtclipError, match=r"not a file nor a tag of ViT-B-16 \(close: openai"):
        resolve_weights("ViT-B-16", "opneai")


def test_offline_tag_download_is_a_one_line_error():
    with pytest.raises(LtclipError) as err:
        load_backbone("ViT-B-16", "openai")  # HF_HUB_OFFLINE=1 and nothing cached
    assert "could not load" in str(err.value) and "\n" not in str(err.value)


def test_text_classifier_is_batched_and_matches_a_direct_computation(tiny):
    names = [f"class {i}" for i in range(7)]
    templates = ["a photo of a {}.", "a {} shape.", "art of the {}."]
    small_batches = text_classifier(tiny, names, templates, texts_per_batch=4)  # 1 class per forward
    with torch.inference_mode():
        rows = []
        for name in names:
            e = tiny.model.encode_text(tiny.tokenizer([t.format(name) for t in templates]), normalize=True).mean(0)
            rows.append((e / e.norm()).numpy())
    np.testing.assert_allclose(small_batches, np.stack(rows), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(small_batches, axis=1), 1, atol=1e-5)
