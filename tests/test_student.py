"""Tests for distil_core.student on tiny random BERTs (CPU, no network)."""

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BertConfig, BertForMaskedLM,
                          BertForSequenceClassification)

from distil_core.errors import UserInputError
from distil_core.student import (StudentSpec, build_student, count_parameters, describe_student,
                                 flops_per_token, pick_layers, student_config)

LAYER = "bert.encoder.layer."


def tiny_config(layers: int = 12, **kw) -> BertConfig:
    args = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_hidden_layers=layers,
                intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return BertConfig(**{**args, **kw})


def teacher(layers: int = 12, mlm: bool = False, **kw):
    torch.manual_seed(0)
    cls = BertForMaskedLM if mlm else BertForSequenceClassification
    model = cls(tiny_config(layers, **kw)).eval()
    with torch.no_grad():  # make biases and LayerNorms non-trivial so copies are really checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (2, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return {"input_ids": ids, "attention_mask": mask}


# --- pick_layers -------------------------------------------------------------

def test_pick_layers_distilbert():
    assert pick_layers(12, 6) == [0, 2, 4, 7, 9, 11]


@pytest.mark.parametrize("n,L,want", [(6, 3, [0, 3, 5]), (12, 12, list(range(12))), (12, 2, [0, 11]),
                                      (12, 1, [11]), (1, 1, [0]), (24, 4, [0, 8, 15, 23]), (6, 2, [0, 5])])
def test_pick_layers_cases(n, L, want):
    assert pick_layers(n, L) == want


def test_pick_layers_spread_invariants():
    for n in range(1, 30):
        for L in range(2, n + 1):
            got = pick_layers(n, L)
            assert got[0] == 0 and got[-1] == n - 1 and len(got) == L
            assert all(a < b for a, b in zip(got, got[1:]))


@pytest.mark.parametrize("n,L", [(6, 7), (12, 0), (12, -1)])
def test_pick_layers_errors(n, L):
    with pytest.raises(ValueError, match="student.num_layers"):
        pick_layers(n, L)


def test_pick_layers_bottom_takes_the_first_layers():
    assert pick_layers(6, 3, "bottom") == [0, 1, 2] and pick_layers(12, 1, "bottom") == [0]
    with pytest.raises(ValueError, match="student.num_layers"):
        pick_layers(6, 7, "bottom")
    with pytest.raises(ValueError, match="student.layer_pick: 'top' is not one of spread, bottom"):
        pick_layers(6, 3, "top")


# --- student_config validation -----------------------------------------------

def test_student_config_defaults_keep_teacher_shape():
    c = student_config(tiny_config(), StudentSpec(num_layers=6))
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (6, 32, 4, 64)
    assert c.vocab_size == 100 and c.num_labels == 3


def test_student_config_slice_defaults_keep_head_size():
    c = student_config(tiny_config(), StudentSpec(num_layers=3, hidden_size=16, init="teacher-slice"))
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 32)


@pytest.mark.parametrize("spec,field", [
    (StudentSpec(6, hidden_size=30, num_heads=4, init="random"), "student.hidden_size"),
    (StudentSpec(6, hidden_size=20, init="random"), "student.hidden_size"),  # not a multiple of head size 8
    (StudentSpec(0), "student.num_layers"),
    (StudentSpec(13), "student.num_layers"),
    (StudentSpec(6, init="copy"), "student.init"),
    (StudentSpec(6, hidden_size=0, num_heads=1, init="random"), "student.hidden_size"),
    (StudentSpec(6, num_heads=0), "student.num_heads"),
    (StudentSpec(6, ffn_ratio=0.0), "student.ffn_ratio"),
    (StudentSpec(6, hidden_size=16), "student.hidden_size"),  # teacher-layers needs the teacher's width
    (StudentSpec(6, num_heads=2), "student.num_heads"),  # teacher-layers needs the teacher's heads
    (StudentSpec(6, ffn_ratio=4.0), "student.ffn_ratio"),
    (StudentSpec(6, hidden_size=48, init="teacher-slice"), "student.hidden_size"),
    (StudentSpec(6, hidden_size=16, num_heads=4, init="teacher-slice"), "student.num_heads"),  # head size 4 != 8
    (StudentSpec(6, hidden_size=16, ffn_ratio=8.0, init="teacher-slice"), "student.ffn_ratio"),
])
def test_student_config_errors_name_the_field(spec, field):
    with pytest.raises(ValueError, match=field) as err:
        student_config(tiny_config(), spec)
    assert isinstance(err.value, UserInputError)


def test_random_init_may_be_deeper_and_any_head_size():
    c = student_config(tiny_config(), StudentSpec(16, hidden_size=24, num_heads=6, ffn_ratio=3, init="random"))
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 24, 6, 72)


# --- teacher-layers ----------------------------------------------------------

@pytest.mark.parametrize("how,picked", [("spread", [0, 2, 4, 7, 9, 11]), ("bottom", [0, 1, 2, 3, 4, 5])])
def test_teacher_layers_copies_picked_layers(how, picked):
    t = teacher()
    s = build_student(t, StudentSpec(6, layer_pick=how))
    assert type(s) is BertForSequenceClassification and s.config.num_hidden_layers == 6
    ts, ss = t.state_dict(), s.state_dict()
    for i, j in enumerate(picked):
        layer_keys = [k for k in ss if k.startswith(f"{LAYER}{i}.")]
        assert len(layer_keys) == 16
        for k in layer_keys:
            assert torch.equal(ss[k], ts[k.replace(f"{LAYER}{i}.", f"{LAYER}{j}.")]), k
    for k in ss:
        if not k.startswith(LAYER):  # embeddings, pooler, classifier
            assert torch.equal(ss[k], ts[k]), k


def test_teacher_layers_full_copy_reproduces_teacher():
    t = teacher()
    s = build_student(t, StudentSpec(12)).eval()
    with torch.no_grad():
        assert torch.equal(s(**batch()).logits, t(**batch()).logits)


def test_new_label_count_keeps_fresh_classifier():
    t = teacher()
    s = build_student(t, StudentSpec(6), num_labels=5)
    assert s.classifier.weight.shape == (5, 32) and s.config.num_labels == 5
    assert torch.equal(s.bert.pooler.dense.weight, t.bert.pooler.dense.weight)


def test_wrong_teacher_class_for_mlm_flag():
    with pytest.raises(ValueError, match="mlm"):
        build_student(teacher(6), StudentSpec(3), mlm=True)


# --- teacher-slice -----------------------------------------------------------

def test_teacher_slice_bottom_cuts_the_first_layers():
    t = teacher()
    s = build_student(t, StudentSpec(3, hidden_size=16, init="teacher-slice", layer_pick="bottom"))
    key = "attention.self.query.weight"
    for i in range(3):
        assert torch.equal(s.state_dict()[f"{LAYER}{i}.{key}"], t.state_dict()[f"{LAYER}{i}.{key}"][:16, :16])


def test_teacher_slice_shapes_and_prefix_values():
    t = teacher()
    s = build_student(t, StudentSpec(6, hidden_size=16, ffn_ratio=1.5, init="teacher-slice"))
    c = s.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (16, 2, 24)
    ts, ss = t.state_dict(), s.state_dict()
    L0 = f"{LAYER}0."
    assert ss[L0 + "attention.self.query.weight"].shape == (16, 16)
    assert ss[L0 + "intermediate.dense.weight"].shape == (24, 16)
    assert ss[L0 + "output.dense.weight"].shape == (16, 24)
    assert ss["bert.embeddings.word_embeddings.weight"].shape == (100, 16)
    assert ss["classifier.weight"].shape == (3, 16)
    # Spelled out per tensor: first 2 heads (x 8 dims) of Q/K/V, matching input columns of attention output.
    j = f"{LAYER}7."  # student layer 3
    s3 = f"{LAYER}3."
    for name in ("query", "key", "value"):
        assert torch.equal(ss[s3 + f"attention.self.{name}.weight"], ts[j + f"attention.self.{name}.weight"][:16, :16])
        assert torch.equal(ss[s3 + f"attention.self.{name}.bias"], ts[j + f"attention.self.{name}.bias"][:16])
    assert torch.equal(ss[s3 + "attention.output.dense.weight"], ts[j + "attention.output.dense.weight"][:16, :16])
    assert torch.equal(ss[s3 + "intermediate.dense.weight"], ts[j + "intermediate.dense.weight"][:24, :16])
    assert torch.equal(ss[s3 + "intermediate.dense.bias"], ts[j + "intermediate.dense.bias"][:24])
    assert torch.equal(ss[s3 + "output.dense.weight"], ts[j + "output.dense.weight"][:16, :24])
    assert torch.equal(ss[s3 + "output.LayerNorm.weight"], ts[j + "output.LayerNorm.weight"][:16])
    assert torch.equal(ss["bert.embeddings.position_embeddings.weight"],
                       ts["bert.embeddings.position_embeddings.weight"][:, :16])
    assert torch.equal(ss["bert.pooler.dense.weight"], ts["bert.pooler.dense.weight"][:16, :16])
    assert torch.equal(ss["classifier.weight"], ts["classifier.weight"][:, :16])
    assert torch.equal(ss["classifier.bias"], ts["classifier.bias"])
    with torch.no_grad():
        assert s.eval()(**batch()).logits.shape == (2, 3)


def test_teacher_slice_full_width_reproduces_teacher():
    t = teacher()
    s = build_student(t, StudentSpec(12, hidden_size=32, init="teacher-slice")).eval()
    with torch.no_grad():
        assert torch.equal(s(**batch()).logits, t(**batch()).logits)


# --- random ------------------------------------------------------------------

def test_random_differs_from_teacher():
    t = teacher(6)
    s = build_student(t, StudentSpec(6, init="random"))
    ts, ss = t.state_dict(), s.state_dict()
    assert not torch.equal(ss["bert.embeddings.word_embeddings.weight"], ts["bert.embeddings.word_embeddings.weight"])
    assert not torch.equal(ss[f"{LAYER}0.attention.self.query.weight"], ts[f"{LAYER}0.attention.self.query.weight"])
    assert not torch.equal(ss["classifier.weight"], ts["classifier.weight"])


# --- MLM ---------------------------------------------------------------------

@pytest.mark.parametrize("spec", [StudentSpec(3), StudentSpec(3, hidden_size=16, init="teacher-slice")])
def test_mlm_student_is_tied(spec):
    t = teacher(6, mlm=True)
    s = build_student(t, spec, mlm=True).eval()
    assert type(s) is BertForMaskedLM
    emb = s.bert.embeddings.word_embeddings.weight
    assert s.cls.predictions.decoder.weight is emb  # still one tensor, not two equal copies
    H = s.config.hidden_size
    assert torch.equal(emb, t.bert.embeddings.word_embeddings.weight[:, :H])
    assert torch.equal(s.cls.predictions.bias, t.cls.predictions.bias)
    assert torch.equal(s.cls.predictions.transform.dense.weight, t.cls.predictions.transform.dense.weight[:H, :H])
    with torch.no_grad():
        assert s(**batch()).logits.shape == (2, 10, 100)


# --- counting ----------------------------------------------------------------

@pytest.mark.parametrize("mlm", [False, True])
def test_count_parameters(mlm):
    s = build_student(teacher(6, mlm=mlm), StudentSpec(3), mlm=mlm)
    n = count_parameters(s)
    assert n["total"] == sum(p.numel() for p in s.parameters())
    H = 32
    assert n["embedding"] == 100 * H + 64 * H + 2 * H + 2 * H
    assert n["non_embedding"] == n["total"] - n["embedding"]
    layer = 4 * (H * H + H) + 2 * H + (64 * H + 64) + (H * 64 + H) + 2 * H
    head = (H * H + H + 3 * H + 3) if not mlm else (H * H + H + 2 * H + 100)  # tied decoder counted once
    assert n["non_embedding"] == 3 * layer + head


def test_flops_per_token_by_hand():
    c = tiny_config(layers=2)  # H=32, I=64
    # matmuls: 2 * 2 layers * (4*32*32 + 2*32*64) = 4 * 8192 = 32768; attention: 4 * 2 * 10 * 32 = 2560
    assert flops_per_token(c, seq_len=10) == 32768 + 2560


def test_describe_student():
    s = build_student(teacher(6), StudentSpec(3))
    d = describe_student(s, seq_len=128)
    assert (d["layers"], d["hidden"], d["heads"], d["ffn"]) == (3, 32, 4, 64)
    assert d["flops_per_token"] == flops_per_token(s.config, 128)
    assert d["total"] == count_parameters(s)["total"]


# --- save / load -------------------------------------------------------------

def test_save_and_reload(tmp_path):
    s = build_student(teacher(), StudentSpec(6, hidden_size=16, init="teacher-slice")).eval()
    s.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    back = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(back) is BertForSequenceClassification
    assert back.config.num_hidden_layers == 6 and back.config.hidden_size == 16
    with torch.no_grad():
        assert torch.equal(back(**batch()).logits, s(**batch()).logits)


def test_measure_latency_orders_small_and_large():
    from transformers import BertConfig, BertForSequenceClassification

    from distil_core.student import measure_latency_ms

    small = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=64))
    big = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=256, num_hidden_layers=6,
                                                   num_attention_heads=4, intermediate_size=1024))
    assert 0 < measure_latency_ms(small, 64, repeats=5) < measure_latency_ms(big, 64, repeats=5)


def test_measure_latencies_times_models_in_turn():
    """Pass i of every model runs before pass i + 1 of any: a load spike hits student and teacher alike."""
    from transformers import BertConfig, BertForSequenceClassification

    from distil_core.student import measure_latencies_ms

    def tiny(layers: int) -> BertForSequenceClassification:
        return BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=layers,
                                                        num_attention_heads=2, intermediate_size=64))

    models, calls = [tiny(1), tiny(2)], []
    for name, model in enumerate(models):
        model.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    latencies = measure_latencies_ms(models, 16, repeats=4)
    assert calls == [0, 1] * 7  # 3 warm-up passes + 4 timed, alternating
    assert len(latencies) == 2 and all(ms > 0 for ms in latencies)
