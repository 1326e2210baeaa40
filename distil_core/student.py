"""Build a smaller BERT student from a teacher, DistilBERT-style.

The student is the teacher's own transformers class with a smaller config.
Weights come from the teacher in one of three ways (StudentSpec.init):

- "teacher-layers": same width; student layer i is a copy of teacher layer pick_layers(...)[i].
- "teacher-slice": narrower; same layer pick, and every tensor is cut to its *prefix*
  along each dimension (first H hidden dims, first A heads, first I FFN units).
  Simple and deterministic, no importance scores. It only keeps whole heads because
  the student's head size must equal the teacher's.
- "random": the model's own init from the student config.

Which teacher layers (StudentSpec.layer_pick): "spread" takes L layers evenly spread over the teacher's,
first and last included (DistilBERT: every other layer); "bottom" takes the teacher's first L layers, as
truncating the model does (Sajjad et al., 2020, found dropping the top layers the best of their
strategies for fine-tuned students).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, PreTrainedModel

from distil_core.config import INITS, LAYER_PICKS, StudentConfig
from distil_core.errors import UserInputError


class StudentError(UserInputError, ValueError):
    """A bad student spec: a ValueError for callers, a UserInputError for the CLI."""


def pick_layers(teacher_layers: int, student_layers: int, how: str = "spread") -> list[int]:
    """The teacher layers student layers 0..L-1 copy: "bottom" is the first L; "spread" spreads L
    evenly over the n teacher layers, first and last included.

    Spread rule: index i -> floor(i * (n - 1) / (L - 1) + 1/2), i.e. round half up, in integer
    arithmetic so there is no float or banker's-rounding surprise.
    12 -> 6 gives [0, 2, 4, 7, 9, 11] (DistilBERT), 6 -> 3 gives [0, 3, 5].
    The step is >= 1 when L <= n, so indices are strictly increasing.
    L == 1 gives [n - 1]: the last layer, whose output is what the losses match.
    """
    n, L = teacher_layers, student_layers
    if n < 1:
        raise StudentError(f"teacher num_hidden_layers: {n} must be >= 1")
    if not 1 <= L <= n:
        raise StudentError(f"student.num_layers: {L} must be between 1 and the teacher's {n} layers")
    if how not in LAYER_PICKS:
        raise StudentError(f"student.layer_pick: {how!r} is not one of {', '.join(LAYER_PICKS)}")
    if how == "bottom":
        return list(range(L))
    if L == 1:
        return [n - 1]
    return [(2 * i * (n - 1) + (L - 1)) // (2 * (L - 1)) for i in range(L)]


@dataclass
class StudentSpec:
    num_layers: int
    hidden_size: int | None = None  # None: the teacher's
    num_heads: int | None = None  # None: keep the teacher's head size (hidden / teacher head dim)
    ffn_ratio: float | None = None  # None: the teacher's intermediate / hidden
    init: str = "teacher-layers"  # one of INITS
    layer_pick: str = "spread"  # one of LAYER_PICKS: which teacher layers a teacher init copies


def spec_from_config(student: StudentConfig) -> StudentSpec:
    """The run config's `student` section as a StudentSpec (the same fields)."""
    return StudentSpec(**dataclasses.asdict(student))


def student_config(teacher_config: BertConfig, spec: StudentSpec) -> BertConfig:
    """The teacher's config with the student's depth and width; raises StudentError on a bad spec."""
    tH, tA, tL = teacher_config.hidden_size, teacher_config.num_attention_heads, teacher_config.num_hidden_layers
    t_head = tH // tA
    if spec.init not in INITS:
        raise StudentError(f"student.init: {spec.init!r} is not one of {', '.join(INITS)}")
    L = spec.num_layers
    if L < 1:
        raise StudentError(f"student.num_layers: {L} must be >= 1")
    if spec.init != "random" and L > tL:
        raise StudentError(f"student.num_layers: {L} is more than the teacher's {tL} layers ({spec.init} init)")
    H = tH if spec.hidden_size is None else spec.hidden_size
    if H < 1:
        raise StudentError(f"student.hidden_size: {H} must be >= 1")
    if spec.num_heads is None:
        if H % t_head:
            raise StudentError(
                f"student.hidden_size: {H} is not a multiple of the teacher's head size {t_head} "
                "(set student.num_heads)")
        A = H // t_head
    else:
        A = spec.num_heads
        if A < 1:
            raise StudentError(f"student.num_heads: {A} must be >= 1")
        if H % A:
            raise StudentError(f"student.hidden_size: {H} is not divisible by student.num_heads {A}")
    ratio = teacher_config.intermediate_size / tH if spec.ffn_ratio is None else spec.ffn_ratio
    I = round(ratio * H)
    if I < 1:
        raise StudentError(f"student.ffn_ratio: {ratio} gives intermediate size {I}, must be >= 1")

    if spec.init == "teacher-layers":
        # Plain copies need identical tensor shapes and the same split into heads.
        if H != tH:
            raise StudentError(f"student.hidden_size: {H} must equal the teacher's {tH} for teacher-layers init "
                               "(use teacher-slice to shrink the width)")
        if A != tA:
            raise StudentError(f"student.num_heads: {A} must equal the teacher's {tA} for teacher-layers init")
        if I != teacher_config.intermediate_size:
            raise StudentError(f"student.ffn_ratio: intermediate size {I} must equal the teacher's "
                               f"{teacher_config.intermediate_size} for teacher-layers init")
    elif spec.init == "teacher-slice":
        if H > tH:
            raise StudentError(f"student.hidden_size: {H} must be <= the teacher's {tH} for teacher-slice init")
        if H // A != t_head:
            raise StudentError(f"student.num_heads: {A} gives head size {H // A}, teacher-slice keeps whole heads "
                               f"so it must be the teacher's {t_head} (num_heads = {H / t_head:g})")
        if I > teacher_config.intermediate_size:
            raise StudentError(f"student.ffn_ratio: intermediate size {I} must be <= the teacher's "
                               f"{teacher_config.intermediate_size} for teacher-slice init")

    config = copy.deepcopy(teacher_config)
    config.num_hidden_layers, config.hidden_size = L, H
    config.num_attention_heads, config.intermediate_size = A, I
    return config


def _prefix(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    # Head-contiguous Q/K/V rows and equal head sizes make "keep the first A heads"
    # the same as "keep the first H rows", so one prefix cut fits every tensor.
    return t[tuple(slice(0, s) for s in shape)]


def build_student(teacher: PreTrainedModel, spec: StudentSpec, num_labels: int | None = None,
                  mlm: bool = False) -> PreTrainedModel:
    """A student of the teacher's class (BertForMaskedLM if mlm else BertForSequenceClassification).

    Returned on CPU in float32 (the model's default); move it where training runs.
    If num_labels differs from the teacher's, the classifier keeps its fresh init.
    """
    cls = BertForMaskedLM if mlm else BertForSequenceClassification
    if not isinstance(teacher, cls):
        raise StudentError(f"mlm={mlm} needs a {cls.__name__} teacher, got {type(teacher).__name__}")
    config = student_config(teacher.config, spec)
    if num_labels is not None and not mlm:
        config.num_labels = num_labels
    student = cls(config)
    if spec.init == "random":
        return student

    pick = pick_layers(teacher.config.num_hidden_layers, config.num_hidden_layers, spec.layer_pick)
    prefix = f"{teacher.base_model_prefix}.encoder.layer."
    t_state = teacher.state_dict()
    new_state = {}
    for key, value in student.state_dict().items():
        if key.startswith("classifier.") and config.num_labels != teacher.config.num_labels:
            continue  # a new label set: nothing to copy
        t_key = key
        if key.startswith(prefix):
            i, rest = key[len(prefix):].split(".", 1)
            t_key = f"{prefix}{pick[int(i)]}.{rest}"
        new_state[key] = _prefix(t_state[t_key], value.shape)
    # strict=False only for the skipped classifier; copy_ in place keeps the MLM decoder tied.
    student.load_state_dict(new_state, strict=False)
    return student


def count_parameters(model: torch.nn.Module) -> dict:
    """Parameter counts; tied weights count once. Embedding = word + position + token type + LayerNorm."""
    total = sum(p.numel() for p in model.parameters())
    base = getattr(model, "base_model", model)
    embedding = sum(p.numel() for p in base.embeddings.parameters())
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}


def flops_per_token(config: BertConfig, seq_len: int) -> int:
    """Forward FLOPs per token of the encoder only (no embeddings, pooler or task head).

    Kaplan-style: 2 FLOPs per multiply-add of each matmul weight, per layer
    4*H*H (Q, K, V, attention output) + 2*H*I (FFN); biases and LayerNorms are ignored.
    Plus attention itself, 2*seq_len*H for Q.K^T and 2*seq_len*H for probs.V, per layer
    (full bidirectional attention, so no causal halving):
        2 * L * (4*H*H + 2*H*I) + 4 * L * seq_len * H
    """
    L, H, I = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    return 2 * L * (4 * H * H + 2 * H * I) + 2 * 2 * L * seq_len * H


def describe_student(model: PreTrainedModel, seq_len: int) -> dict:
    """Sizes, parameter counts and FLOPs in one flat dict for logging."""
    c = model.config
    return {
        "layers": c.num_hidden_layers,
        "hidden": c.hidden_size,
        "heads": c.num_attention_heads,
        "ffn": c.intermediate_size,
        **count_parameters(model),
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(c, seq_len),
    }


def measure_latency_ms(model: PreTrainedModel, seq_len: int, batch_size: int = 1, repeats: int = 20,
                       device: torch.device | str = "cpu") -> float:
    """Median forward time in ms of one batch of `batch_size` x `seq_len` tokens (after warm-up)."""
    return measure_latencies_ms([model], seq_len, batch_size, repeats, device)[0]


def measure_latencies_ms(models: Sequence[PreTrainedModel], seq_len: int, batch_size: int = 1, repeats: int = 20,
                         device: torch.device | str = "cpu") -> list[float]:
    """Median forward times in ms of `models`, timed in turn: pass i of every model runs before pass i + 1
    of any, so a load spike on a shared machine lands on all of them and their ratio stays fair."""
    import time

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    inputs = []
    for model in models:
        model.to(device).eval()
        # its own generator: timing a student between its seeded build and its training changes nothing
        ids = torch.randint(1000 % model.config.vocab_size, model.config.vocab_size, (batch_size, seq_len),
                            generator=torch.Generator().manual_seed(0)).to(device)
        inputs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    times: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for i in range(repeats + 3):
            for model, batch, kept in zip(models, inputs, times):
                sync()
                t0 = time.perf_counter()
                model(**batch)
                sync()
                if i >= 3:  # the first calls pay for allocation and kernel selection
                    kept.append((time.perf_counter() - t0) * 1000)
    return [float(sorted(kept)[len(kept) // 2]) for kept in times]
