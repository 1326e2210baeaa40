"""The DistilBERT triple loss: soft-target KD, hard-label loss, hidden-state cosine (+ optional logit MSE).

Modeled on HF's research_projects/distillation/distiller.py. Every function is pure and computes
in float32, because teacher logits may be cached in fp16 and students may run in bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

TASK_KINDS = ("classification", "regression", "mlm")


def _zero(like: Tensor) -> Tensor:
    # A zero that keeps the graph, so backward() works on a batch with no valid position.
    return like.float().sum() * 0.0


def _select(x: Tensor, mask: Tensor | None) -> Tensor:
    """Rows (N, C) at valid positions; indexing (not multiplying) so padding can never leak in."""
    if mask is None:
        return x.reshape(-1, x.shape[-1])
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(x.shape[:-1])}")
    return x[mask.bool()]


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: student shape {tuple(a.shape)} != teacher shape {tuple(b.shape)}")


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float,
            mask: Tensor | None = None) -> Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over valid positions (rows or tokens)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_same_shape(student_logits, teacher_logits, "kd_loss")
    s, t = _select(student_logits, mask).float(), _select(teacher_logits, mask).float()
    if s.shape[0] == 0:
        return _zero(student_logits)
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    # T^2 keeps the gradient scale independent of T (Hinton et al. 2015).
    return kl.mean() * temperature**2


def logit_mse_loss(student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Squared error summed over the logit dim, averaged over valid positions (as distiller.py)."""
    _check_same_shape(student_logits, teacher_logits, "logit_mse_loss")
    s, t = _select(student_logits, mask).float(), _select(teacher_logits, mask).float()
    if s.shape[0] == 0:
        return _zero(student_logits)
    return (s - t).pow(2).sum(-1).mean()


def cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean over non-padding tokens of 1 - cos(student, teacher): CosineEmbeddingLoss with target 1."""
    if student_hidden.shape[-1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"cosine_loss needs equal hidden widths: student {student_hidden.shape[-1]}, "
            f"teacher {teacher_hidden.shape[-1]} (pass a projection)"
        )
    _check_same_shape(student_hidden, teacher_hidden, "cosine_loss")
    valid = attention_mask == 1
    s, t = _select(student_hidden, valid).float(), _select(teacher_hidden, valid).float()
    if s.shape[0] == 0:
        return _zero(student_hidden)
    return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.float(), labels.long())


def mlm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy over the vocab; labels == -100 are not predicted."""
    if not bool((labels != -100).any()):
        return _zero(logits)  # cross_entropy would return nan here
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).long(),
                           ignore_index=-100)


def _flat(x: Tensor) -> Tensor:
    # Regression heads give (b, 1); labels come as (b,).
    return x.float().reshape(x.shape[0]) if x.dim() == 2 and x.shape[-1] == 1 else x.float()


def regression_loss(predictions: Tensor, targets: Tensor) -> Tensor:
    return F.mse_loss(_flat(predictions), _flat(targets))


def regression_kd_loss(student_pred: Tensor, teacher_pred: Tensor) -> Tensor:
    """STS-B style KD: match the teacher's score directly; a temperature means nothing here."""
    return F.mse_loss(_flat(student_pred), _flat(teacher_pred))


def hard_loss(kind: str, logits: Tensor, labels: Tensor) -> Tensor:
    if kind == "classification":
        return classification_loss(logits, labels)
    if kind == "regression":
        return regression_loss(logits, labels)
    if kind == "mlm":
        return mlm_loss(logits, labels)
    raise ValueError(f"unknown task kind {kind!r}; expected one of {TASK_KINDS}")


@dataclass(frozen=True)
class LossWeights:
    """Term weights; defaults are DistilBERT's (alpha_ce 5, alpha_mlm 2, alpha_cos 1, alpha_mse 0)."""

    alpha_kd: float = 5.0
    alpha_hard: float = 2.0
    alpha_cos: float = 1.0
    alpha_mse: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0:
                raise ValueError(f"{f.name} must be >= 0, got {getattr(self, f.name)}")
        if all(getattr(self, f.name) == 0 for f in fields(self)):
            raise ValueError("all loss weights are zero (alpha_kd, alpha_hard, alpha_cos, alpha_mse)")


class HiddenProjection(torch.nn.Module):
    """Student width -> teacher width for the cosine term; trained alongside, never exported."""

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(student_width, teacher_width)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype))


def make_projection(student_width: int, teacher_width: int) -> HiddenProjection | None:
    if student_width <= 0 or teacher_width <= 0:
        raise ValueError(f"hidden widths must be > 0, got student {student_width}, teacher {teacher_width}")
    return None if student_width == teacher_width else HiddenProjection(student_width, teacher_width)


def _need(value: Tensor | None, name: str, weight: str) -> Tensor:
    if value is None:
        raise ValueError(f"{weight} > 0 needs {name}, which was not given")
    return value


def combine_losses(weights: LossWeights, *, task_kind: str, temperature: float,
                   student_logits: Tensor, labels: Tensor, teacher_logits: Tensor | None = None,
                   student_hidden: Tensor | None = None, teacher_hidden: Tensor | None = None,
                   attention_mask: Tensor | None = None, projection: torch.nn.Module | None = None,
                   kd_mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
    """Weighted sum of the active terms, plus a flat float dict of each term raw and weighted.

    Zero-weight terms are skipped entirely, so e.g. alpha_cos=0 needs no hidden states.
    """
    if task_kind not in TASK_KINDS:
        raise ValueError(f"unknown task kind {task_kind!r}; expected one of {TASK_KINDS}")
    if task_kind == "mlm" and kd_mask is None:
        kd_mask = labels != -100  # DistilBERT distils only at the masked positions
    terms: dict[str, tuple[float, Tensor]] = {}
    if weights.alpha_kd > 0:
        teacher = _need(teacher_logits, "teacher_logits", "alpha_kd")
        terms["kd"] = (weights.alpha_kd, regression_kd_loss(student_logits, teacher) if task_kind == "regression"
                       else kd_loss(student_logits, teacher, temperature, kd_mask))
    if weights.alpha_hard > 0:
        terms["hard"] = (weights.alpha_hard, hard_loss(task_kind, student_logits, labels))
    if weights.alpha_cos > 0:
        s_hidden = _need(student_hidden, "student_hidden", "alpha_cos")
        t_hidden = _need(teacher_hidden, "teacher_hidden", "alpha_cos")
        mask = _need(attention_mask, "attention_mask", "alpha_cos")
        if projection is not None:
            s_hidden = projection(s_hidden)
        terms["cos"] = (weights.alpha_cos, cosine_loss(s_hidden, t_hidden, mask))
    if weights.alpha_mse > 0:
        teacher = _need(teacher_logits, "teacher_logits", "alpha_mse")
        terms["mse"] = (weights.alpha_mse, logit_mse_loss(student_logits, teacher, kd_mask))

    total = sum((w * loss for w, loss in terms.values()), start=_zero(student_logits))
    log: dict[str, float] = {}
    for name, (w, loss) in terms.items():
        log[f"loss/{name}"] = loss.detach().item()
        log[f"loss/{name}_weighted"] = (w * loss).detach().item()
    log["loss/total"] = total.detach().item()
    return total, log
