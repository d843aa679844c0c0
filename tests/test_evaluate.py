import numpy as np
import pytest
import torch

from cifar_transfer.analysis.metrics import score_predictions
from cifar_transfer.data.cifar import CLASSES
from cifar_transfer.model.inference import predict_logits


def one_hot_logits(pred: list[int]) -> np.ndarray:
    logits = np.zeros((len(pred), 10), dtype=np.float32)
    logits[np.arange(len(pred)), pred] = 5.0
    return logits


CAT, DOG, AUTO, TRUCK = (CLASSES.index(c) for c in ("cat", "dog", "automobile", "truck"))


@pytest.fixture
def result():
    # 10 cats: 7 right, 3 taken for dogs; 10 dogs: 9 right, 1 cat; 5 trucks: 3 right, 2 automobiles;
    # 5 automobiles right.
    labels = [CAT] * 10 + [DOG] * 10 + [TRUCK] * 5 + [AUTO] * 5
    pred = [CAT] * 7 + [DOG] * 3 + [DOG] * 9 + [CAT] + [TRUCK] * 3 + [AUTO] * 2 + [AUTO] * 5
    return score_predictions(one_hot_logits(pred), np.array(labels))


def test_accuracy_loss_and_errors(result):
    assert result["n"] == 30
    assert result["errors"] == 6
    assert result["accuracy"] == pytest.approx(24 / 30)
    right, wrong = -np.log(np.exp(5) / (np.exp(5) + 9)), -np.log(1 / (np.exp(5) + 9))
    assert result["loss"] == pytest.approx((24 * right + 6 * wrong) / 30, rel=1e-5)


def test_per_class_scores(result):
    cat = result["per_class"]["cat"]
    assert cat["recall"] == pytest.approx(0.7)
    assert cat["precision"] == pytest.approx(7 / 8)
    assert cat["f1"] == pytest.approx(2 * 0.7 * 7 / 8 / (0.7 + 7 / 8))
    assert cat["support"] == 10
    assert result["per_class"]["airplane"]["support"] == 0


def test_confusion_and_leakage(result):
    cm = np.array(result["confusion"])
    assert cm[CAT, DOG] == 3 and cm[DOG, CAT] == 1 and cm[TRUCK, AUTO] == 2
    assert cm.sum() == 30
    assert np.array(result["confusion_normalised"])[CAT, DOG] == pytest.approx(0.3)
    leak = {(r["a"], r["b"]): r for r in result["leakage"]}
    assert leak[("cat", "dog")]["a_as_b"] == pytest.approx(0.3)
    assert leak[("cat", "dog")]["b_as_a"] == pytest.approx(0.1)
    assert leak[("automobile", "truck")]["b_as_a"] == pytest.approx(0.4)
    assert leak[("automobile", "truck")]["a_as_b"] == 0
    assert leak[("bird", "airplane")]["a_as_b"] == 0  # no birds at all: no division by zero


def test_most_confused_pairs_are_ranked_by_errors(result):
    top = result["most_confused"]
    assert (top[0]["a"], top[0]["b"], top[0]["errors"]) == ("cat", "dog", 4)
    assert (top[1]["a"], top[1]["b"], top[1]["errors"]) == ("automobile", "truck", 2)
    assert all(p["errors"] == 0 for p in top[2:])


def test_misclassified_are_the_wrong_ones_by_loss():
    labels = np.array([0, 1, 2, 3])
    logits = np.zeros((4, 10), dtype=np.float32)
    logits[0, 0] = 3  # right
    logits[1, 5] = 1  # wrong, mild
    logits[2, 7] = 6  # wrong, confident: highest loss
    logits[3, 3] = 2  # right
    rows = score_predictions(logits, labels)["misclassified"]
    assert [r["index"] for r in rows] == [2, 1]
    assert rows[0]["true"] == "bird" and rows[0]["predicted"] == "horse"
    assert rows[0]["confidence"] > rows[1]["confidence"]


def test_logits_survive_a_forward_that_reuses_its_output_buffer():
    """A CUDA-graph replay (torch.compile mode reduce-overhead) returns the same output tensor every
    call; the batches' logits must not all end up as the last batch's."""
    buffer = torch.zeros(4, 10)

    def replay(x: torch.Tensor) -> torch.Tensor:
        return buffer.copy_(x.flatten(1)[:, :10])

    x = torch.randn(12, 3, 4, 4)
    assert torch.equal(predict_logits(replay, x, batch_size=4), x.flatten(1)[:, :10])
