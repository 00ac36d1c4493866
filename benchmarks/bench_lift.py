"""LIFT's and LIFT+'s training step against the paper's frozen decoder, on one model, side by side.

For each: trainable parameters at a class count, and the median time of one optimizer step on a
batch of random images (interleaved rounds, so a drifting machine affects all alike). LIFT and
LIFT+ train the same network (AdaptFormer + the pooled cosine head; LIFT+ differs in its crops,
lr and epochs); the paper's decoder runs the frozen encoder without gradients, then trains its
3-block head on the token sequence; from a token cache (``train-head``) only the head runs.
Random weights: the cost does not depend on them.

    python -m benchmarks.bench_lift --model ViT-B-16 --batch 8 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch
import torch.nn.functional as F


def setups(model: str, classes: int):
    """name -> (step function, trainable parameters)."""
    from ltclip.models.backbone import load_backbone
    from ltclip.models.heads import HeadInputs, create_head
    from ltclip.models.tuning import apply_tuning, count_trainable

    logging.getLogger("ltclip.models.backbone").setLevel(logging.ERROR)
    lift = load_backbone(model, "none")
    apply_tuning(lift.model, "adaptformer", {}, num_classes=classes)
    embed, tokens = lift.encode_dims()
    cosine = create_head("cosine", HeadInputs(classes, embed, tokens, pooled_dim=lift.pooled_dim),
                         input="pooled", init_scale=25.0, learn_scale=False)
    params = [p for p in lift.model.visual.parameters() if p.requires_grad] + list(cosine.parameters())
    lift_opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)

    def lift_step(x, y):
        loss = F.cross_entropy(cosine(lift.encode_pooled(x)), y)
        loss.backward()
        lift_opt.step()
        lift_opt.zero_grad(set_to_none=True)

    frozen = load_backbone(model, "none")
    decoder = create_head("decoder", HeadInputs(classes, embed, tokens))
    dec_opt = torch.optim.AdamW(decoder.parameters(), lr=0.01)

    def decoder_step(x, y):
        with torch.no_grad():
            _, seq = frozen.encode(x, tokens=True)
        loss = F.cross_entropy(decoder(seq.float()), y)
        loss.backward()
        dec_opt.step()
        dec_opt.zero_grad(set_to_none=True)

    cached = {}  # the token sequences a cache holds, per batch shape

    def cached_step(x, y):  # train-head on a token cache: the head alone
        if x.shape not in cached:
            with torch.no_grad():
                cached[x.shape] = frozen.encode(x, tokens=True)[1].float()
        loss = F.cross_entropy(decoder(cached[x.shape]), y)
        loss.backward()
        dec_opt.step()
        dec_opt.zero_grad(set_to_none=True)

    probe = create_head("cosine", HeadInputs(classes, embed, tokens, pooled_dim=lift.pooled_dim),
                        input="pooled", init_scale=25.0, learn_scale=False)
    probe_opt = torch.optim.SGD(probe.parameters(), lr=0.01, momentum=0.9)
    pooled = {}  # the pooled features a cache of `extract --pooled` holds, per batch shape

    def classifier_step(x, y, from_cache: bool):  # LIFT's classifier alone (--tune frozen)
        if not from_cache or x.shape not in pooled:
            with torch.no_grad():
                pooled[x.shape] = frozen.encode_pooled(x)
        loss = F.cross_entropy(probe(pooled[x.shape]), y)
        loss.backward()
        probe_opt.step()
        probe_opt.zero_grad(set_to_none=True)

    decoder_params = sum(p.numel() for p in decoder.parameters())
    probe_params = sum(p.numel() for p in probe.parameters())
    return {"lift / lift+ (AdaptFormer + pooled cosine head)": (lift_step, count_trainable(lift.model) + sum(p.numel() for p in cosine.parameters())),
            "paper's decoder (frozen encoder + 3-block decoder)": (decoder_step, decoder_params),
            "paper's decoder from a token cache (train-head)": (cached_step, decoder_params),
            "LIFT's classifier alone, encoding images (finetune --tune frozen)": (lambda x, y: classifier_step(x, y, False), probe_params),
            "LIFT's classifier alone from a pooled cache (train-head)": (lambda x, y: classifier_step(x, y, True), probe_params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    runs = setups(args.model, args.classes)
    size = 224
    x, y = torch.randn(args.batch, 3, size, size), torch.randint(0, args.classes, (args.batch,))
    times = {name: [] for name in runs}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, (step, _) in runs.items():
            start = time.perf_counter()
            step(x, y)
            if r:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["paper's decoder (frozen encoder + 3-block decoder)"])
    out = {name: {"trainable": runs[name][1], "step_s": statistics.median(t), "vs_decoder": statistics.median(t) / base}
           for name, t in times.items()}
    print(json.dumps({"model": args.model, "classes": args.classes, "batch": args.batch, "threads": torch.get_num_threads(),
                      "results": out}, indent=1))


if __name__ == "__main__":
    main()
