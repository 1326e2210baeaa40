"""Dev evaluation time against optim.eval_batch_size: the quickstart's dev pass (SST-2 dev, its first 400
rows, max_length 64, the packaged MiniLM tokenizer) through a 3-layer, 384-wide student, each batch size
timed side by side, interleaved. Rows go shortest first, so a bigger batch spans more lengths and pads
more; on a GPU that is cheap, on a CPU thread each padded token costs as much as a real one.

    GLUE_DIR=../shared/data/glue python bench/eval_batch.py [--threads 1] [--sizes 16 32 64 128] [--repeats 6]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification

from distil_core.config import config_from_dict
from distil_core.recipe import load_task_data, task_evaluator
from distil_core.tasks import get_task
from distil_core.teacher import load_tokenizer, resolve_teacher


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64, 128])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--dev-limit", type=int, default=400)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = config_from_dict({"data": {"task": "sst2", "max_length": 64, "train_limit": 64, "dev_limit": args.dev_limit}})
    task, tokenizer = get_task("sst2"), load_tokenizer(resolve_teacher(cfg.teacher.name))
    _, dev, collate = load_task_data(cfg, task, tokenizer, cfg.data.train_limit)
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=384, num_hidden_layers=3,
                                                     num_attention_heads=12, intermediate_size=1536)).eval()
    lengths = np.sort([len(x) for x in next(iter(dev.values()))["input_ids"]])
    evaluators = {bs: task_evaluator(task, dev, collate, bs, torch.device("cpu")) for bs in args.sizes}
    times: dict[int, list[float]] = {bs: [] for bs in args.sizes}
    for _ in range(args.repeats + 1):  # the first round warms up
        for bs, evaluate in evaluators.items():
            t = time.perf_counter()
            with torch.no_grad():
                evaluate(model)
            times[bs].append(time.perf_counter() - t)
    base = statistics.median(times[max(args.sizes)][1:])
    print(f"{len(lengths)} dev rows, {lengths.sum()} tokens; {args.threads} thread(s); median of {args.repeats}")
    print("| eval_batch_size | padded tokens | dev pass | time vs the largest |")
    print("|---|---|---|---|")
    for bs in args.sizes:
        padded = sum(int(lengths[i:i + bs].max()) * len(lengths[i:i + bs]) for i in range(0, len(lengths), bs))
        med = statistics.median(times[bs][1:])
        print(f"| {bs} | {padded:,} | {med:.2f} s | {med / base:.2f}x |")


if __name__ == "__main__":
    main()
