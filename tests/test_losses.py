"""Loss values against hand computation, T^2 gradient scaling, padding invariance, combiner bookkeeping."""

import math

import numpy as np
import pytest
import torch

from distil_core.losses import (
    HiddenProjection,
    LossWeights,
    classification_loss,
    combine_losses,
    cosine_loss,
    hard_loss,
    kd_loss,
    logit_mse_loss,
    make_projection,
    mlm_loss,
    regression_kd_loss,
    regression_loss,
)


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _np_kd(s: np.ndarray, t: np.ndarray, temp: float) -> float:
    """Per-row KL(p_t || p_s) = sum_i p_t[i] * (log p_t[i] - log p_s[i]), times T^2, row mean."""
    ps, pt = _np_softmax(s / temp), _np_softmax(t / temp)
    return float((pt * (np.log(pt) - np.log(ps))).sum(-1).mean() * temp**2)


# ---- values against hand computation -------------------------------------------------------


def test_kd_loss_two_class_by_formula():
    # One row, 2 classes, T=2: teacher [2, 0] -> p_t = softmax([1, 0]); student [0, 0] -> p_s = [.5, .5].
    a = math.exp(1) / (math.exp(1) + 1)
    expected = 4 * (a * math.log(a / 0.5) + (1 - a) * math.log((1 - a) / 0.5))
    got = kd_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), temperature=2.0)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_matches_numpy_with_row_mask_and_fp16_teacher():
    s = np.array([[1.0, -0.5, 0.2], [0.3, 0.3, 2.0], [-1.0, 0.0, 1.0]])
    t = np.array([[0.5, 0.5, -1.0], [2.0, -2.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([True, True, False])
    got = kd_loss(torch.tensor(s, dtype=torch.bfloat16), torch.tensor(t, dtype=torch.float16), 3.0, mask)
    assert got.dtype == torch.float32
    s_bf16 = torch.tensor(s, dtype=torch.bfloat16).double().numpy()  # bf16 rounding of the inputs
    assert got.item() == pytest.approx(_np_kd(s_bf16[:2], t[:2], 3.0), rel=1e-4)


def test_kd_loss_token_level_averages_selected_positions():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 3, 5)), rng.normal(size=(2, 3, 5))
    mask = np.array([[1, 0, 1], [0, 0, 1]], dtype=bool)
    got = kd_loss(torch.tensor(s), torch.tensor(t), 2.0, torch.tensor(mask))
    assert got.item() == pytest.approx(_np_kd(s[mask], t[mask], 2.0), rel=1e-5)


def test_kd_loss_no_valid_position_is_zero_with_grad():
    s = torch.randn(2, 3, 4, requires_grad=True)
    loss = kd_loss(s, torch.randn(2, 3, 4), 2.0, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None and torch.all(s.grad == 0)


def test_cosine_loss_by_hand():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [5.0, 5.0]]])
    t = torch.tensor([[[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 1, 0]])
    # token 0: orthogonal -> 1 - 0 = 1; token 1: cos = 2 / (sqrt(2) * 2) = 1/sqrt(2); token 2 is padding.
    expected = (1.0 + (1 - 1 / math.sqrt(2))) / 2
    assert cosine_loss(s, t, mask).item() == pytest.approx(expected, rel=1e-6)


def test_cosine_loss_rejects_width_mismatch_naming_both():
    with pytest.raises(ValueError, match=r"student 3.*teacher 5"):
        cosine_loss(torch.randn(1, 2, 3), torch.randn(1, 2, 5), torch.ones(1, 2))


def test_logit_mse_by_hand():
    s = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[3.0, 3.0], [7.0, 7.0]]])
    t = torch.tensor([[[0.0, 0.0], [9.0, 9.0]], [[1.0, 3.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False], [True, False]])
    # valid rows: (1^2 + 2^2) = 5 and (2^2 + 0^2) = 4 -> mean 4.5
    assert logit_mse_loss(s, t, mask).item() == pytest.approx(4.5)
    assert logit_mse_loss(s[:, 0], t[:, 0]).item() == pytest.approx(4.5)


def test_regression_losses_by_hand():
    pred, target = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.5, 2.0, 1.0])
    expected = (0.25 + 0.0 + 9.0) / 3
    assert regression_loss(pred, target).item() == pytest.approx(expected)
    assert regression_loss(pred.squeeze(1), target).item() == pytest.approx(expected)
    assert regression_kd_loss(pred, target.unsqueeze(1).half()).item() == pytest.approx(expected)
    assert hard_loss("regression", pred, target).item() == pytest.approx(expected)


def test_classification_and_mlm_cross_entropy_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [1/4, 3/4]
    assert classification_loss(logits, torch.tensor([1])).item() == pytest.approx(-math.log(0.75))
    vocab_logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, -100, 0]])
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert mlm_loss(vocab_logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert hard_loss("mlm", vocab_logits, labels).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="unknown task kind"):
        hard_loss("ner", logits, torch.tensor([1]))


# ---- T^2 keeps the gradient scale ----------------------------------------------------------


def _grad_norm(s: torch.Tensor, t: torch.Tensor, temp: float, undo_t2: bool) -> float:
    s = s.clone().requires_grad_(True)
    loss = kd_loss(s, t, temp)
    (loss / temp**2 if undo_t2 else loss).backward()
    return s.grad.norm().item()


def test_kd_gradient_scale_is_stable_across_temperatures():
    # d/ds [T^2 KL] = T (p_s - p_t) / N. For |logits| << T, p ~ (1 + x/T)/C, so the gradient
    # -> centered(s - t) / (C N), independent of T; without T^2 it shrinks like 1/T^2.
    g = torch.Generator().manual_seed(0)
    s, t = 0.1 * torch.randn(4, 6, generator=g), 0.1 * torch.randn(4, 6, generator=g)
    base = _grad_norm(s, t, 1.0, undo_t2=False)
    base_raw = _grad_norm(s, t, 1.0, undo_t2=True)
    for temp in (2.0, 4.0, 8.0):
        assert 0.5 <= _grad_norm(s, t, temp, undo_t2=False) / base <= 2.0
        raw_ratio = _grad_norm(s, t, temp, undo_t2=True) / base_raw
        assert raw_ratio == pytest.approx(1 / temp**2, rel=0.5)


# ---- padding never matters -----------------------------------------------------------------


def _scramble(x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Replace padded positions with large garbage; pad is (b, s) bool."""
    noise = 1e3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return torch.where(pad.unsqueeze(-1), noise.to(x.dtype), x)


ATTN = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
PAD = ATTN == 0


def test_kd_token_level_ignores_masked_positions():
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    before = kd_loss(s, t, 2.0, ~PAD)
    assert kd_loss(_scramble(s, PAD), _scramble(t, PAD), 2.0, ~PAD).item() == pytest.approx(before.item())
    assert logit_mse_loss(_scramble(s, PAD), t, ~PAD).item() == pytest.approx(logit_mse_loss(s, t, ~PAD).item())
    # sanity: without the mask the garbage does change the loss
    assert kd_loss(_scramble(s, PAD), t, 2.0).item() != pytest.approx(kd_loss(s, t, 2.0).item())


def test_cosine_ignores_padding():
    s, t = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    before = cosine_loss(s, t, ATTN).item()
    assert cosine_loss(_scramble(s, PAD), _scramble(t, PAD), ATTN).item() == pytest.approx(before)
    assert cosine_loss(_scramble(s, PAD), t, torch.ones_like(ATTN)).item() != pytest.approx(before)


def _mlm_batch():
    g = torch.Generator().manual_seed(2)
    labels = torch.full((2, 5), -100)
    labels[0, 1], labels[1, 0], labels[1, 4] = 3, 6, 2
    return dict(
        student_logits=torch.randn(2, 5, 7, generator=g),
        teacher_logits=torch.randn(2, 5, 7, generator=g),
        student_hidden=torch.randn(2, 5, 4, generator=g),
        teacher_hidden=torch.randn(2, 5, 4, generator=g),
        labels=labels,
        attention_mask=ATTN,
        kd_mask=labels != -100,
    )


ALL_ON = LossWeights(alpha_kd=5.0, alpha_hard=2.0, alpha_cos=1.0, alpha_mse=0.5)


def test_combine_losses_ignores_padding_mlm():
    batch = _mlm_batch()
    _, before = combine_losses(ALL_ON, task_kind="mlm", temperature=2.0, **batch)
    for key in ("student_logits", "teacher_logits", "student_hidden", "teacher_hidden"):
        changed = dict(batch, **{key: _scramble(batch[key], PAD)})
        _, after = combine_losses(ALL_ON, task_kind="mlm", temperature=2.0, **changed)
        assert after == pytest.approx(before), key


def test_mlm_kd_defaults_to_masked_positions():
    # DistilBERT distils only where labels != -100; the combiner falls back to that without kd_mask.
    batch = _mlm_batch()
    _, explicit = combine_losses(ALL_ON, task_kind="mlm", temperature=2.0, **batch)
    _, default = combine_losses(ALL_ON, task_kind="mlm", temperature=2.0, **dict(batch, kd_mask=None))
    _, everywhere = combine_losses(ALL_ON, task_kind="mlm", temperature=2.0,
                                   **dict(batch, kd_mask=torch.ones(2, 5, dtype=torch.bool)))
    assert default == pytest.approx(explicit)
    assert default["loss/kd"] != pytest.approx(everywhere["loss/kd"])


def test_combine_losses_ignores_padding_classification():
    g = torch.Generator().manual_seed(3)
    batch = dict(student_logits=torch.randn(2, 3, generator=g), teacher_logits=torch.randn(2, 3, generator=g),
                 labels=torch.tensor([0, 2]), student_hidden=torch.randn(2, 5, 4, generator=g),
                 teacher_hidden=torch.randn(2, 5, 4, generator=g), attention_mask=ATTN)
    _, before = combine_losses(ALL_ON, task_kind="classification", temperature=3.0, **batch)
    changed = dict(batch, student_hidden=_scramble(batch["student_hidden"], PAD),
                   teacher_hidden=_scramble(batch["teacher_hidden"], PAD))
    _, after = combine_losses(ALL_ON, task_kind="classification", temperature=3.0, **changed)
    assert after == pytest.approx(before)


# ---- projection ------------------------------------------------------------------------------


def test_make_projection_only_when_widths_differ():
    assert make_projection(8, 8) is None
    proj = make_projection(4, 8)
    assert isinstance(proj, HiddenProjection)
    assert proj(torch.randn(2, 3, 4)).shape == (2, 3, 8)


def test_combine_losses_with_projection_trains_projection():
    batch = _mlm_batch()
    s_hidden = torch.randn(2, 5, 3, requires_grad=True)
    batch["student_hidden"] = s_hidden
    proj = make_projection(3, 4)
    assert proj is not None
    with pytest.raises(ValueError, match="student 3.*teacher 4"):
        combine_losses(ALL_ON, task_kind="mlm", temperature=2.0, **batch)
    total, log = combine_losses(ALL_ON, task_kind="mlm", temperature=2.0, projection=proj, **batch)
    total.backward()
    assert "loss/cos" in log
    for p in proj.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert s_hidden.grad is not None and s_hidden.grad.abs().sum() > 0


# ---- weights and combiner bookkeeping --------------------------------------------------------


@pytest.mark.parametrize("field", ["alpha_kd", "alpha_hard", "alpha_cos", "alpha_mse"])
def test_loss_weights_reject_negative(field):
    with pytest.raises(ValueError, match=field):
        LossWeights(**{field: -0.1})


def test_loss_weights_reject_all_zero_and_keep_distilbert_defaults():
    with pytest.raises(ValueError, match="zero"):
        LossWeights(alpha_kd=0, alpha_hard=0, alpha_cos=0, alpha_mse=0)
    assert LossWeights() == LossWeights(5.0, 2.0, 1.0, 0.0)


def test_total_is_sum_of_weighted_terms():
    total, log = combine_losses(ALL_ON, task_kind="mlm", temperature=2.0, **_mlm_batch())
    terms = ("kd", "hard", "cos", "mse")
    assert set(log) == {f"loss/{n}" for n in terms} | {f"loss/{n}_weighted" for n in terms} | {"loss/total"}
    assert log["loss/total"] == pytest.approx(sum(log[f"loss/{n}_weighted"] for n in terms), rel=1e-6)
    assert total.item() == pytest.approx(log["loss/total"])
    assert log["loss/kd_weighted"] == pytest.approx(5.0 * log["loss/kd"])
    assert log["loss/mse_weighted"] == pytest.approx(0.5 * log["loss/mse"])


def test_zero_weight_terms_absent_and_need_no_inputs():
    s = torch.randn(3, 2, requires_grad=True)
    weights = LossWeights(alpha_kd=1.0, alpha_hard=1.0, alpha_cos=0.0, alpha_mse=0.0)
    total, log = combine_losses(weights, task_kind="classification", temperature=2.0, student_logits=s,
                                labels=torch.tensor([0, 1, 1]), teacher_logits=torch.randn(3, 2))
    assert set(log) == {"loss/kd", "loss/kd_weighted", "loss/hard", "loss/hard_weighted", "loss/total"}
    total.backward()
    assert s.grad is not None
    _, hard_only = combine_losses(LossWeights(alpha_kd=0, alpha_hard=1, alpha_cos=0), task_kind="classification",
                                  temperature=2.0, student_logits=s, labels=torch.tensor([0, 1, 1]))
    assert set(hard_only) == {"loss/hard", "loss/hard_weighted", "loss/total"}


def test_missing_inputs_for_weighted_terms_raise():
    s, labels = torch.randn(3, 2), torch.tensor([0, 1, 1])
    with pytest.raises(ValueError, match="teacher_logits"):
        combine_losses(LossWeights(alpha_cos=0), task_kind="classification", temperature=2.0,
                       student_logits=s, labels=labels)
    with pytest.raises(ValueError, match="teacher_hidden"):
        combine_losses(LossWeights(), task_kind="classification", temperature=2.0, student_logits=s,
                       labels=labels, teacher_logits=s, student_hidden=torch.randn(3, 4, 8),
                       attention_mask=torch.ones(3, 4))


def test_regression_kd_ignores_temperature():
    s, t, y = torch.tensor([[0.5], [2.0]]), torch.tensor([[1.0], [1.0]]), torch.tensor([0.0, 3.0])
    weights = LossWeights(alpha_kd=1.0, alpha_hard=1.0, alpha_cos=0.0)
    _, log1 = combine_losses(weights, task_kind="regression", temperature=1.0, student_logits=s, labels=y,
                             teacher_logits=t)
    _, log4 = combine_losses(weights, task_kind="regression", temperature=4.0, student_logits=s, labels=y,
                             teacher_logits=t)
    assert log1 == pytest.approx(log4)
    assert log1["loss/kd"] == pytest.approx((0.25 + 1.0) / 2)
    assert log1["loss/hard"] == pytest.approx((0.25 + 1.0) / 2)
