"""The CoOp prompt head (ltclip/models/heads/prompt.py) on the tiny open_clip model: zero-shot at
init, only ctx trains, chunked + checkpointed = naive, the sampled regime's cache, rebuilding; and
wired into the stages: train-head on an extracted cache, runs that reload to the same logits, eval,
and one-line refusals where the text tower cannot be rebuilt."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import TINY_MODEL
from ltclip.cli import app
from ltclip.core.errors import LtclipError
from ltclip.models.backbone import load_backbone
from ltclip.models.heads import HEADS, HeadInputs, create_head, rebuild_head
from ltclip.models.text_prompts import text_encoder
from ltclip.artifacts.runs import load_run
from ltclip.artifacts.store import FeatureCache, write_arrays

runner = CliRunner()

NAMES = ["cat", "golden retriever", "Aaaa bbbbus cccus", "red-winged blackbird", "x", "sea anemone",
         "Quercus robur", "tram", "hot-air balloon", "lesser spotted woodpecker", "ant", "Zz"]


@pytest.fixture(scope="module")
def bb():
    return load_backbone(TINY_MODEL, "none")


def build(te, **opts):
    """The prompt head on text tower ``te``, through the factory."""
    return create_head("prompt", HeadInputs(len(te.classnames), te.embed_dim, text_encoder=te), **opts)


def zero_shot(bb, names, template="a photo of a {}."):
    with torch.no_grad():
        return F.normalize(bb.model.encode_text(bb.tokenizer([template.format(n) for n in names])), dim=-1)


def naive_features(bb, tokens, ctx, n_ctx):
    """Every prompt at once, full context length, no chunks, no checkpointing: ``encode_text``'s steps."""
    m = bb.model
    emb = m.token_embedding(tokens)
    c = ctx if ctx.ndim == 3 else ctx.expand(len(tokens), -1, -1)
    x = torch.cat([emb[:, :1], c, emb[:, 1 + n_ctx :]], dim=1) + m.positional_embedding
    x = m.ln_final(m.transformer(x, attn_mask=m.attn_mask))
    return F.normalize(x[torch.arange(len(x)), tokens.argmax(-1)] @ m.text_projection, dim=-1)


def embeds(bb, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return bb.model.encode_image(torch.randn(n, 3, 32, 32, generator=g))


@pytest.mark.parametrize("class_specific", [False, True])
def test_init_is_zero_shot_clip_with_the_init_phrase(bb, class_specific):
    head = build(text_encoder(bb, NAMES[:5]), class_specific=class_specific).eval()
    ref = zero_shot(bb, NAMES[:5])
    torch.testing.assert_close(head.classifier.exact(), ref, atol=1e-5, rtol=0)
    x = embeds(bb, 3)
    scale = bb.model.logit_scale.exp().item()
    torch.testing.assert_close(head(x), scale * F.normalize(x, dim=-1) @ ref.T, atol=1e-4, rtol=0)
    assert head.classifier.ctx.shape == ((5, 4, 64) if class_specific else (4, 64))
    assert list(head.state_dict()) == ["classifier.ctx"]
    assert head.config == {"num_classes": 5, "embed_dim": 32, "token_shape": None, **HEADS.options("prompt"),
                           "class_specific": class_specific}
    torch.testing.assert_close(head.classifier.weight, scale * ref, atol=1e-3, rtol=0)


def test_another_init_phrase_and_random_context(bb):
    te = text_encoder(bb, NAMES[:4])
    head = build(te, init="itap of the").eval()
    torch.testing.assert_close(head.classifier.exact(), zero_shot(bb, NAMES[:4], "itap of the {}."), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    rand = build(te, init="", context=16, class_specific=True)
    ctx = rand.classifier.ctx
    assert ctx.shape == (4, 16, 64) and abs(ctx.std().item() - 0.02) < 0.002
    assert rand.classifier.tokens[0, 1:17].unique().numel() == 1  # the placeholder "X" ×16
    assert torch.isfinite(rand.eval()(embeds(bb, 2))).all()


def test_bad_options_are_refused(bb):
    te = text_encoder(bb, NAMES[:3])
    with pytest.raises(LtclipError, match=r"^--head prompt needs the model's text tower and the class names, [^\n]+$"):
        create_head("prompt", HeadInputs(3, 32))  # a caller with no text tower to give
    with pytest.raises(LtclipError, match="context=0"):
        build(te, context=16)  # the default init has 4 tokens
    with pytest.raises(LtclipError, match="context"):
        build(te, init="")
    with pytest.raises(LtclipError, match="sample"):
        build(te, sample="easy")
    with pytest.raises(LtclipError, match="class names"):
        create_head("prompt", HeadInputs(4, 32, text_encoder=te))


def test_only_ctx_trains_and_the_loss_falls(bb):
    te = text_encoder(bb, NAMES[:6])
    head = build(te, chunk=4).train()
    tower = {k: v.clone() for k, v in bb.model.state_dict().items()}
    assert [n for n, _ in head.named_parameters()] == ["classifier.ctx"]
    x, y = embeds(bb, 24, seed=1), torch.randint(0, 6, (24,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(head.parameters(), lr=0.05, weight_decay=0.0)
    ctx0, losses = head.classifier.ctx.detach().clone(), []
    for _ in range(15):
        loss = F.cross_entropy(head(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in bb.model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(head.classifier.ctx, ctx0)
    assert all(torch.equal(v, bb.model.state_dict()[k]) for k, v in tower.items())


@pytest.mark.parametrize("class_specific", [False, True])
def test_chunked_checkpointed_equals_naive(bb, class_specific):
    te = text_encoder(bb, NAMES)  # 12 classes, chunks of 5
    torch.manual_seed(3)
    head = build(te, chunk=5, class_specific=class_specific).train()
    with torch.no_grad():  # move away from the init so every class and position matters
        head.classifier.ctx.add_(0.05 * torch.randn_like(head.classifier.ctx))
    x, y = embeds(bb, 7, seed=4), torch.arange(7)
    logits = head(x)
    F.cross_entropy(logits, y).backward()
    ctx = head.classifier.ctx.detach().clone().requires_grad_(True)
    tokens = bb.tokenizer([f"a photo of a {n}." for n in NAMES])
    ref = bb.model.logit_scale.exp() * F.normalize(x, dim=-1) @ naive_features(bb, tokens, ctx, 4).T
    F.cross_entropy(ref, y).backward()
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-5)
    tol = 1e-4 * ctx.grad.abs().max().item()  # float32 sums in another order
    torch.testing.assert_close(head.classifier.ctx.grad, ctx.grad, atol=tol, rtol=1e-4)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs (activation memory)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_checkpointing_keeps_activation_memory_from_growing_with_classes(bb):
    x = embeds(bb, 4)
    saved = {}
    for n in (16, 64):
        te = text_encoder(bb, [f"class {i}" for i in range(n)])
        head = build(te, chunk=8).train()
        tokens = head.classifier.tokens
        saved["chunked", n] = _saved_bytes(lambda: head(x))
        saved["naive", n] = _saved_bytes(lambda: naive_features(bb, tokens, head.classifier.ctx, 4))
    assert saved["naive", 64] > 3.5 * saved["naive", 16]  # naive: linear in C
    # chunked: the checkpoints' inputs (ctx, class indices) and the logits' input, nothing per token
    assert saved["chunked", 64] < 64 * 32 * 4
    assert saved["chunked", 64] - saved["chunked", 16] <= (64 - 16) * 8  # an int64 index per class


def _step(head, opt, x, y):
    loss = F.cross_entropy(head(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("sample", ["hard", "uniform"])
def test_sampled_classes_fresh_rest_cached_exact_at_eval(bb, sample):
    te = text_encoder(bb, NAMES)
    torch.manual_seed(5)
    head = build(te, classes_per_step=4, refresh_every=3, chunk=3, sample=sample).train()
    clf = head.classifier
    x, y = embeds(bb, 6, seed=6), torch.arange(6)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    refreshes = []
    for _ in range(8):
        _step(head, opt, x, y)
        refreshes.append(clf.refreshes)
    assert refreshes == [1, 1, 1, 2, 2, 2, 3, 3]  # at training forwards 0, 3 and 6 (after 0, 3, 6 steps)

    cached = clf._cache.clone()
    logits = head(x)
    fresh = clf.last_fresh
    stale = torch.ones(len(NAMES), dtype=torch.bool)
    stale[fresh] = False
    assert len(fresh) == 4 and stale.sum() == len(NAMES) - 4
    z = F.normalize(x, dim=-1)
    torch.testing.assert_close(logits[:, stale], clf.scale * z @ cached[stale].T, atol=1e-5, rtol=0)
    exact = naive_features(bb, clf.tokens, clf.ctx.detach(), 4)
    assert not torch.allclose(cached[stale], exact[stale], atol=1e-4)  # the stale rows are stale...
    torch.testing.assert_close(logits[:, fresh], clf.scale * z @ exact[fresh].T, atol=1e-4, rtol=0)  # ...fresh are not
    if sample == "hard":  # every sample's top-1 class under the cache, then every top-2, ...
        ranked = (z @ cached.T).topk(4, dim=1).indices.T.reshape(-1).tolist()
        assert fresh.tolist() == list(dict.fromkeys(ranked))[:4]
    logits.sum().backward()
    assert clf.ctx.grad is not None

    head.eval()
    torch.testing.assert_close(head(x), clf.scale * z @ exact.T, atol=1e-4, rtol=0)
    assert clf.exact() is clf.exact()  # cached until ctx changes
    before = clf.exact()
    opt.step()  # ctx changes: the exact classifier is recomputed
    assert not torch.equal(clf.exact(), before)


def test_exact_cache_follows_ctx_even_under_a_fused_optimizer(bb):
    head = build(text_encoder(bb, NAMES[:4])).train()
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, fused=True)  # updates without a version bump
    x = embeds(bb, 3)
    F.cross_entropy(head(x), torch.arange(3)).backward()
    before = head.eval().classifier.exact().clone()
    opt.step()
    after = head.classifier.exact()
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, naive_features(bb, head.classifier.tokens, head.classifier.ctx.detach(), 4),
                               atol=1e-5, rtol=0)


def test_targets_are_always_fresh(bb):
    head = build(text_encoder(bb, NAMES), classes_per_step=3, sample="uniform").train()
    x = embeds(bb, 2)
    head(x, torch.tensor([7, 11]))
    assert head.classifier.last_fresh[:2].tolist() == [7, 11] and len(head.classifier.last_fresh) == 3


def test_state_dict_round_trip_rebuilds_identical_logits(bb):
    te = text_encoder(bb, NAMES[:5])
    head = build(te, class_specific=True, classes_per_step=2, refresh_every=2, chunk=2).train()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    x, y = embeds(bb, 5, seed=7), torch.arange(5)
    for _ in range(3):
        _step(head, opt, x, y)
    state, config = head.state_dict(), json.loads(json.dumps(head.config))
    assert list(state) == ["classifier.ctx"]
    rebuilt = rebuild_head("prompt", config, text_encoder(bb, NAMES[:5]))
    rebuilt.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), head.eval()(x), atol=0, rtol=0)


def test_copies_share_the_tower_and_moves_carry_it():
    bb = load_backbone(TINY_MODEL, "none")  # its own: this test casts the tower
    head = build(text_encoder(bb, NAMES[:3])).eval()
    x = embeds(bb, 2)
    expected = head(x)
    twin = copy.deepcopy(head.classifier).eval()  # what second stages do with head.classifier
    assert twin.text is head.classifier.text
    torch.testing.assert_close(twin(head.features(x)), expected, atol=0, rtol=0)
    assert twin.weight.shape == (3, 32)
    head.double()
    assert bb.model.transformer.resblocks[0].mlp.c_fc.weight.dtype == torch.float64
    assert bb.model.positional_embedding.dtype == torch.float64
    torch.testing.assert_close(head(x.double()).float(), expected, atol=1e-4, rtol=0)


# ---------------------------------------------------------------- wired into the stages and runs


def ok(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def extracted(synthetic_root, tmp_path_factory):
    """train/val caches of the synthetic images, extracted by `ltclip extract` with the tiny model."""
    out = tmp_path_factory.mktemp("prompt") / "features"
    ok("extract", "--dataset", "synthetic", "--data-root", synthetic_root, "--model", TINY_MODEL, "--pretrained", "none",
       "--splits", "train,val", "--no-tokens", "--workers", "0", "--device", "cpu", "--out", out)
    return out


def test_train_head_prompt_run_reloads_to_its_logits_and_evaluates(extracted, bb, tmp_path):
    run = tmp_path / "run"
    ok("train-head", "--features", extracted, "--head", "prompt", "--head-opt", "chunk=4", "--loss", "ce", "--epochs", "4",
       "--batch-size", "32", "--lr", "1e-2", "--warmup", "0", "--device", "cpu", "--out", run)
    log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"], log
    payload = torch.load(run / "model.pt", weights_only=True)
    with FeatureCache(extracted / "val.h5") as cache:
        names, x = cache.classnames, torch.from_numpy(cache.load_embeds()[:, 0].astype(np.float32))
    assert payload["head"]["text_encoder"] == {"model": TINY_MODEL, "pretrained": "none", "checkpoint_sha256": "",
                                               "quick_gelu": False, "classnames": names}
    ctx = payload["head"]["state_dict"]["classifier.ctx"]
    tokens = bb.tokenizer([f"a photo of a {n}." for n in names])
    with torch.no_grad():
        assert not torch.allclose(naive_features(bb, tokens, ctx, 4), zero_shot(bb, names), atol=1e-3)  # it trained
        expected = bb.model.logit_scale.exp() * F.normalize(x, dim=-1) @ naive_features(bb, tokens, ctx, 4).T
        logits = load_run(run).model(x)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
        assert torch.equal(load_run(run).model(x), logits)  # every reload: the same logits
    ok("eval", run, "--split", "val", "--json", tmp_path / "e.json")
    best = json.loads((run / "run.json").read_text())["best"]
    result = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert result["balanced_accuracy"] == pytest.approx(best["val_balanced_accuracy"])  # what training selected


@pytest.mark.parametrize("attrs, message", [
    ({"model": TINY_MODEL, "pretrained": "file", "checkpoint_sha256": "ab" * 32}, "checkpoint file known only by its sha256"),
    ({"model": TINY_MODEL, "pretrained": "/gone/tiny.pt"}, "cannot rebuild the text tower of --features"),
    ({"model": TINY_MODEL, "pretrained": "none", "quick_gelu": True}, "loads with other quick_gelu than --features"),
    ({"model": "gaussian", "pretrained": "none"}, "(--model 'gaussian': unknown open_clip model"),
    ({}, "records no model/pretrained"),  # a user-made cache
])
def test_train_head_prompt_refuses_a_cache_whose_text_tower_cannot_be_rebuilt(tmp_path, attrs, message):
    rng = np.random.default_rng(0)
    (tmp_path / "features").mkdir()
    for split in ("train", "val"):
        write_arrays(tmp_path / "features" / f"{split}.h5", rng.standard_normal((12, 32)).astype(np.float32),
                     np.arange(12) % 3, ["a", "b", "c"], {"dataset": "made", **attrs})
    result = runner.invoke(app, ["train-head", "--features", str(tmp_path / "features"), "--head", "prompt",
                                 "--device", "cpu", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.startswith("error: --head prompt: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1

