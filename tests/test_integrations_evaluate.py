"""acr_optim.integrations.evaluate: BLEU and accuracy through `evaluate` when its metric loads, else computed
directly, same score."""

from __future__ import annotations

import logging

import pytest

sacrebleu = pytest.importorskip("sacrebleu")
evaluate = pytest.importorskip("evaluate")

from acr_optim.integrations import evaluate as bleu_module

HYPOTHESES = ["the cat sat on the mat.", "A dog runs in the park", "hello there, general kenobi!", "no overlap at all"]
REFERENCES = ["the cat sat on a mat.", "a dog is running in the park", "hello there, general kenobi!", "something else"]


@pytest.fixture(autouse=True)
def fresh_metric_cache():
    bleu_module.sacrebleu_metric.cache_clear()
    bleu_module.accuracy_metric.cache_clear()
    yield
    bleu_module.sacrebleu_metric.cache_clear()
    bleu_module.accuracy_metric.cache_clear()


def test_offline_fallback_equals_sacrebleu_and_says_so_once(monkeypatch, caplog):
    def offline(path, *args, **kwargs):
        raise FileNotFoundError(f"Couldn't find a module script at ./{path}/{path}.py.\nsecond line")

    monkeypatch.setattr(evaluate, "load", offline)
    with caplog.at_level(logging.INFO, logger=bleu_module.__name__):
        scores = [bleu_module.corpus_bleu(HYPOTHESES, REFERENCES) for _ in range(2)]
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    assert scores == [expected, expected]
    # sacreBLEU's defaults, which evaluate's metric keeps: case-sensitive, 13a tokenisation (both matter here)
    assert expected != sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], lowercase=True).score
    assert expected != sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES], tokenize="none").score
    # at INFO, not a warning: the score is the same either way, so the console of a run stays quiet
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.INFO,
            "BLEU: evaluate.load('sacrebleu') is not available (FileNotFoundError: Couldn't find a module script at "
            "./sacrebleu/sacrebleu.py.); computing it with sacrebleu.corpus_bleu directly, with the same settings",
        )
    ]


class RecordingMetric:
    """Stands in for the loaded ``evaluate`` module: records its input, scores it as the Hub metric does."""

    def __init__(self):
        self.calls = []

    def compute(self, *, predictions, references):
        self.calls.append((predictions, references))
        streams = [[refs[i] for refs in references] for i in range(len(references[0]))]
        return {"score": sacrebleu.corpus_bleu(predictions, streams).score}


def test_loaded_metric_gets_one_reference_list_per_hypothesis(monkeypatch):
    metric = RecordingMetric()
    monkeypatch.setattr(evaluate, "load", lambda path: metric if path == "sacrebleu" else None)
    score = bleu_module.corpus_bleu(HYPOTHESES, REFERENCES)
    assert metric.calls == [(HYPOTHESES, [[r] for r in REFERENCES])]
    assert score == sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score


def test_lengths_must_match():
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu_module.corpus_bleu(["a", "b"], ["a"])


def test_accuracy_offline_fallback_and_loaded_metric(monkeypatch, caplog):
    def offline(path, *args, **kwargs):
        raise FileNotFoundError(f"Couldn't find a module script at ./{path}/{path}.py.")

    monkeypatch.setattr(evaluate, "load", offline)
    with caplog.at_level(logging.INFO, logger=bleu_module.__name__):
        assert [bleu_module.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) for _ in range(2)] == [0.75, 0.75]
    assert [r.getMessage() for r in caplog.records] == [
        "accuracy: evaluate.load('accuracy') is not available (FileNotFoundError: Couldn't find a module script at "
        "./accuracy/accuracy.py.); computing it with numpy: the share of predictions equal to their reference"
    ]
    bleu_module.accuracy_metric.cache_clear()
    calls = []

    class Accuracy:  # the Hub metric's interface and value (sklearn's accuracy_score)
        def compute(self, *, predictions, references):
            calls.append((predictions, references))
            return {"accuracy": sum(p == r for p, r in zip(predictions, references)) / len(references)}

    monkeypatch.setattr(evaluate, "load", lambda path: Accuracy() if path == "accuracy" else None)
    assert bleu_module.accuracy((0, 1, 1), (0, 1, 0)) == 2 / 3 and calls == [([0, 1, 1], [0, 1, 0])]
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        bleu_module.accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="no predictions"):
        bleu_module.accuracy([], [])
