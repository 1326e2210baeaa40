"""AdamW as torch runs it by default on the CPU (a per-tensor loop) against its fused kernel, which the
trainer uses: the optimizer step alone and a whole training step (forward, backward, clipping, step) of a
3-layer, 384-wide student of MiniLM-L6 (the glue-small defaults' shape), measured side by side, interleaved.

    python bench/optimizer.py [--threads 2] [--batch 32] [--seq 48] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import BertConfig, BertForSequenceClassification

KINDS = {"default (per-tensor loop)": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def student() -> BertForSequenceClassification:
    # all-MiniLM-L6-v2's dimensions, 3 of its 6 layers
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=3, num_attention_heads=12,
                        intermediate_size=1536, num_labels=2)
    return BertForSequenceClassification(config)


def time_steps(model, opt, batch, n: int, optimizer_only: bool) -> float:
    if optimizer_only:
        for p in model.parameters():
            p.grad = torch.full_like(p, 1e-3)
    t = time.perf_counter()
    for _ in range(n):
        if not optimizer_only:
            opt.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return (time.perf_counter() - t) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=48, help="tokens per row (SST-2 batches pad to ~30-60)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = student()
    batch = {"input_ids": torch.randint(1000, 30000, (args.batch, args.seq)),
             "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
             "labels": torch.randint(0, 2, (args.batch,))}
    runs = {}
    for kind, kw in KINDS.items():
        model = student()
        model.load_state_dict(base.state_dict())
        runs[kind] = (model, torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, **kw))
    times: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.repeats):  # interleaved, so drift in the machine's load hits every kind alike
        for optimizer_only, n in ((True, 10), (False, 3)):
            for kind, (model, opt) in runs.items():
                times.setdefault((kind, optimizer_only), []).append(time_steps(model, opt, batch, n, optimizer_only))
    print(f"torch {torch.__version__}, {args.threads} threads, batch {args.batch} x {args.seq} tokens, "
          f"{sum(p.numel() for p in base.parameters()):,} parameters; median of {args.repeats} (ms)")
    print(f"{'AdamW':28s} {'optimizer step':>15s} {'training step':>14s}")
    fused_opt, fused_train = (statistics.median(times[("fused", o)]) for o in (True, False))
    for kind in KINDS:
        o, t = statistics.median(times[(kind, True)]), statistics.median(times[(kind, False)])
        print(f"{kind:28s} {o:10.1f} ({o / fused_opt:3.1f}x) {t:9.1f} ({t / fused_train:3.2f}x)")


if __name__ == "__main__":
    main()
