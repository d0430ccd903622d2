"""evaluation.evaluators: accuracies equal the same numbers computed by hand from the model."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from evaluation.errors import DataError, EvaluationError
from evaluation.evaluators import (EVALUATORS, accuracy_classification, accuracy_zero_shot, zero_shot_head,
                                   zero_shot_logits)
from evaluation.models import TextModel
from tests.tiny_bert import CLASS_WORDS, make_task_rows, make_tiny_bert, perturb_checkpoint

NAMES = ["animal", "colour"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evals")
    base = make_tiny_bert(root / "base", seed=0)
    expert = perturb_checkpoint(base, root / "expert", seed=4, scale=0.1)
    clf = make_tiny_bert(root / "clf", seed=7, num_labels=2)
    rows = make_task_rows(24, seed=1)
    return {"base": base, "expert": expert, "clf": clf, "texts": [r["text"] for r in rows],
            "labels": [r["label"] for r in rows]}


def _by_hand(emb: torch.Tensor, head: torch.Tensor, labels) -> float:
    cos = torch.empty(emb.shape[0], head.shape[0])
    for i in range(emb.shape[0]):
        for c in range(head.shape[0]):
            cos[i, c] = torch.dot(emb[i], head[c]) / (emb[i].norm() * head[c].norm())
    return sum(int(cos[i].argmax()) == y for i, y in enumerate(labels)) / len(labels)


def test_zero_shot_accuracy_matches_hand_computation(setup):
    model = TextModel.load(setup["base"], device="cpu")
    texts, labels = setup["texts"], setup["labels"]
    head = zero_shot_head(model, NAMES, "a text about {label}", batch_size=1)
    assert head.shape == (2, 32)
    torch.testing.assert_close(head, model.embed(["a text about animal", "a text about colour"]))
    acc = accuracy_zero_shot(model, head, texts, labels, batch_size=5)
    assert acc == pytest.approx(_by_hand(model.embed(texts), head, labels), abs=1e-12)
    logits = zero_shot_logits(model, head, texts, scale=10.0)
    torch.testing.assert_close(logits, 10.0 * model.embed(texts) @ head.mT)

    # a head from the class words separates the task, and it stays frozen while the weights change
    word_head = zero_shot_head(model, [" ".join(ws) for ws in CLASS_WORDS])
    acc_words = accuracy_zero_shot(model, word_head, texts, labels)
    assert acc_words >= 0.75  # chance is 0.5
    model.set_state(load_file(os.path.join(setup["expert"], "model.safetensors")))
    expert_acc = accuracy_zero_shot(model, word_head, texts, labels)
    expert = TextModel.load(setup["expert"], device="cpu")
    assert expert_acc == pytest.approx(_by_hand(expert.embed(texts), word_head, labels), abs=1e-12)


def test_classification_accuracy_matches_hf_model(setup):
    model = TextModel.load(setup["clf"], device="cpu")
    texts, labels = setup["texts"], setup["labels"]
    acc = accuracy_classification(model, texts, labels, batch_size=4)
    from transformers import AutoTokenizer, BertForSequenceClassification

    hf = BertForSequenceClassification.from_pretrained(setup["clf"], local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(setup["clf"], local_files_only=True)
    preds = []
    with torch.no_grad():
        for t in texts:
            preds.append(int(hf(**tok(t, return_tensors="pt")).logits.argmax()))
    assert acc == pytest.approx(sum(p == y for p, y in zip(preds, labels)) / len(labels), abs=1e-12)
    assert model.classify(texts).argmax(1).tolist() == preds
    assert 0 < len(set(preds)) <= 2


def test_errors(setup):
    model = TextModel.load(setup["base"], device="cpu")
    head = zero_shot_head(model, NAMES)
    with pytest.raises(EvaluationError, match="2 texts but 1 labels"):
        accuracy_zero_shot(model, head, ["a", "b"], [0])
    with pytest.raises(EvaluationError, match="label 5 of example 2 is outside the 2 classes"):
        accuracy_zero_shot(model, head, ["a", "b"], [0, 5])
    with pytest.raises(EvaluationError, match="no examples"):
        accuracy_zero_shot(model, head, [], [])
    with pytest.raises(DataError, match=r"prompt 'a photo of a \{name\}'"):
        zero_shot_head(model, NAMES, "a photo of a {name}")
    with pytest.raises(EvaluationError, match="dimension 8"):
        zero_shot_logits(model, torch.ones(2, 8), ["a"])
    assert EVALUATORS == ("text_zero_shot", "sequence_classification")
