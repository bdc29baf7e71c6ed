"""Report/VQA/retrieval evaluation: hand-computed metric values, agreement with the libraries, the CLIs."""

from __future__ import annotations

import argparse
import csv
import json
import math
import socket
import time

import pytest
import torch
from safetensors.torch import save_file

from voxtext.cli import main
from voxtext.evaluation.retrieval import recall_at_k
from voxtext.evaluation.text_metrics import (
    HUB_PROBE_SECONDS,
    bertscore_f1,
    bertscore_model,
    bleu1,
    meteor,
    rouge1,
    score_texts,
    tokenize_13a,
)
from voxtext.evaluation.vlm_eval import _bertscore, evaluate_vqa, read_records
from voxtext.phantom import generate_phantom

PAIRS = [
    ("the liver is normal", "the liver is normal and unremarkable"),
    ("The liver is normal.", "The liver is normal and unremarkable."),
    ("the the the", "the cat"),
    ("No focal lesion, kidneys are normal in size.", "Kidneys normal. No focal lesion."),
    ("Mild splenomegaly (14 cm).", "The spleen measures 14 cm, mildly enlarged."),
    ("xyz", "the liver"),
]


def read_csv(path):
    with path.open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache: the BERTScore default must be the offline MiniLM."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def test_bleu1_by_hand():
    # 4 of 4 unigrams match; 4 words against 6: brevity penalty exp(1 - 6/4)
    assert bleu1("the liver is normal", "the liver is normal and unremarkable") == pytest.approx(math.exp(-0.5))
    assert bleu1("the the the", "the cat") == pytest.approx(1 / 3)  # clipped to one "the"; longer: no penalty
    assert tokenize_13a("normal.") == ["normal", "."]  # 13a splits the full stop off a word
    assert bleu1("Liver normal.", "Liver normal.") == pytest.approx(1.0)
    assert bleu1("liver normal.", "Liver normal.") == pytest.approx(2 / 3)  # case-sensitive, as the reference
    assert bleu1("", "the liver") == 0.0 and bleu1("xyz", "the liver") == 0.0
    # several references: counts clipped per word by the most generous one, length of the shortest
    assert bleu1("a a b", ["a b", "a a c d"]) == pytest.approx(1.0)
    assert bleu1("a", ["a b c", "a b"]) == pytest.approx(math.exp(1 - 2))


def test_bleu1_equals_sacrebleu_with_one_reference():
    from sacrebleu.metrics import BLEU

    sacre = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a", effective_order=False)
    for prediction, reference in PAIRS:
        assert bleu1(prediction, reference) == pytest.approx(sacre.sentence_score(prediction, [reference]).score / 100)


def test_rouge1_by_hand_and_equals_rouge_score():
    from rouge_score.rouge_scorer import RougeScorer

    # precision 4/4, recall 4/6: F = 2 * 1 * (2/3) / (1 + 2/3) = 0.8
    assert rouge1("the liver is normal", "the liver is normal and unremarkable") == pytest.approx(0.8)
    assert rouge1("Liver: NORMAL", "liver normal") == pytest.approx(1.0)  # lower-cased, punctuation dropped
    assert rouge1("kidneys", ["liver", "kidneys normal"]) == pytest.approx(2 / 3)  # best reference
    scorer = RougeScorer(["rouge1"], use_stemmer=False)
    for prediction, reference in PAIRS:
        assert rouge1(prediction, reference) == scorer.score(reference, prediction)["rouge1"].fmeasure


def test_meteor_by_hand_with_offline_wordnet():
    # all 4 words matched in one chunk: F_mean = 1, penalty 0.5 * (1/4)^3
    assert meteor("the liver is enlarged", "the liver is enlarged") == pytest.approx(1 - 0.5 / 64)
    # "big" matches "bad" only through WordNet synonyms (synset big.s.02)
    assert meteor("the cold is big", "the cold is bad") == pytest.approx(1 - 0.5 / 64)
    # nltk looks synonyms up after Porter stemming ("large" -> "larg"), so "big" ~ "large" does not count:
    # 3 of 4 matched in 1 chunk, P = R = 3/4, penalty 0.5 * (1/3)^3
    assert meteor("the liver is big", "the liver is large") == pytest.approx(0.75 * (1 - 0.5 / 27))
    # 3 of 4 matched exactly, 2 chunks: P = R = 3/4, penalty 0.5 * (2/3)^3
    expected = 0.75 * (1 - 0.5 * (2 / 3) ** 3)
    assert meteor("the liver is xyz", "the kidney is xyz") == pytest.approx(expected)


def test_bertscore_offline_model_is_labelled(offline_hub):
    model = bertscore_model()
    assert not model.is_paper and "NOT the paper's roberta-large layer 17" in model.label
    scores = bertscore_f1(["the liver is normal", "the liver is normal"],
                          ["the liver is normal", "large bilateral pleural effusions"], model)
    assert scores[0] == pytest.approx(1.0, abs=1e-5) and scores[1] < 0.9


def test_score_texts_skips_only_an_unavailable_metric(offline_hub):
    rows, notes = score_texts(["a b"], ["a b"], ["bleu1", "bertscore"], bertscore=None)
    assert rows[0]["bleu1"] == pytest.approx(1.0) and rows[0]["bertscore"] == pytest.approx(1.0, abs=1e-5)
    assert "all-MiniLM-L6-v2" in notes["bertscore"]


def test_eval_report_cli_on_a_jsonl(tmp_path, capsys, offline_hub):
    pred = tmp_path / "pred.jsonl"
    pred.write_text("\n".join(json.dumps({"id": f"c{i}", "prediction": p}) for i, (p, _) in enumerate(PAIRS[:3])))
    refs = tmp_path / "refs"
    refs.mkdir()
    for i, (_, r) in enumerate(PAIRS[:3]):
        (refs / f"c{i}.txt").write_text(r + "\n")
    out = tmp_path / "out"
    assert main(["eval-report", "--pred", str(pred), "--ref", str(refs), "--out", str(out), "--device", "cpu"]) == 0
    rows = read_csv(out / "report_scores.csv")
    assert [r["id"] for r in rows] == ["c0", "c1", "c2"]
    assert float(rows[0]["bleu1"]) == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert float(rows[2]["rouge1"]) == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), abs=1e-6)
    assert float(rows[0]["meteor"]) > 0 and 0 < float(rows[0]["bertscore"]) <= 1
    summary = (out / "summary.md").read_text()
    mean_bleu = (math.exp(-0.5) + bleu1(*PAIRS[1]) + 1 / 3) / 3
    assert f"{100 * mean_bleu:.2f}" in summary and "NOT the paper's" in summary
    assert "all-MiniLM-L6-v2 layer 6 (offline; roberta-large is not in the Hugging Face cache and HF_HUB_OFFLINE" \
        in summary
    assert "summary" not in capsys.readouterr().err

    # an explicit model wins over the default, and no fallback reason is given for it
    assert main(["eval-report", "--pred", str(pred), "--ref", str(refs), "--out", str(out), "--device", "cpu",
                 "--metrics", "bertscore", "--bertscore-model", "minilm", "--bertscore-layer", "5"]) == 0
    summary = (out / "summary.md").read_text()
    assert "all-MiniLM-L6-v2 layer 5 (offline; NOT the paper's" in summary and "HF_HUB_OFFLINE" not in summary


def test_bertscore_default_is_the_labelled_minilm_offline(offline_hub):
    start = time.monotonic()
    model = bertscore_model()
    assert time.monotonic() - start < 2
    assert model.layer == 6 and not model.is_paper and model.source.endswith("model")
    assert "HF_HUB_OFFLINE is set" in model.label and "values are not comparable" in model.label


def test_explicit_bertscore_model_wins_over_the_default(offline_hub):
    paper = bertscore_model("roberta-large")  # not downloaded here; chosen anyway, no silent fallback
    assert (paper.source, paper.layer, paper.is_paper) == ("roberta-large", 17, True)
    assert "as the paper" in paper.label
    args = argparse.Namespace(metrics=["bertscore"], bertscore_model="roberta-large", bertscore_layer=None)
    assert _bertscore(args) == paper
    args.bertscore_model = None
    assert not _bertscore(args).is_paper  # the default, offline: MiniLM
    assert bertscore_model("minilm", 4).layer == 4


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_bertscore_default_falls_back_fast_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with socket.socket() as silent:  # accepts connections (backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        for endpoint in (f"http://127.0.0.1:{_closed_port()}", f"http://127.0.0.1:{silent.getsockname()[1]}"):
            monkeypatch.setenv("HF_ENDPOINT", endpoint)
            start = time.monotonic()
            model = bertscore_model()
            assert time.monotonic() - start < HUB_PROBE_SECONDS + 2, endpoint
            assert not model.is_paper and "the Hugging Face Hub is unreachable" in model.label


def test_eval_vqa_closed_strict_and_substring_and_open_per_type(tmp_path):
    choices = ["yes", "no", "uncertain", "not assessable"]
    rows = [
        {"id": "1", "prediction": "B. no", "answer": "no", "answer_choice": "B", "question_type": 4,
         "choices": choices},
        {"id": "2", "prediction": "DNA.", "answer": "yes", "answer_choice": "A", "question_type": 4,
         "choices": choices},
        {"id": "3", "prediction": "uncertain", "answer": "uncertain", "question_type": 1, "choices": choices},
        {"id": "4", "prediction": "the liver", "answer": "the liver", "question_type": 3},
        {"id": "5", "prediction": "liver", "answer": "the spleen", "question_type": 5},
    ]
    result, written = evaluate_vqa(rows, tmp_path, ["bleu1", "rouge1"])
    closed = result["closed"]
    assert closed["Abnormality"] == 0.5 and closed["Plane"] == 1.0  # "DNA." is no answer to a strict parser
    assert closed["all (mean over questions)"] == pytest.approx(2 / 3)
    table = read_csv(tmp_path / "vqa_closed.csv")
    assert [r["accuracy_substring"] for r in table] == ["1.000000", "1.000000", "0.000000"]  # the reference's test
    opened = result["open"]
    assert opened["Organ"]["bleu1"] == 1.0 and opened["Location"]["bleu1"] == 0.0
    assert opened["Location"]["rouge1"] == 0.0
    assert opened["all (mean over questions)"]["bleu1"] == pytest.approx(0.5)
    assert "| Abnormality | 2 | 50.00 | 100.00 |" in (tmp_path / "summary.md").read_text()


def test_m3d_vqa_csv_columns_are_read(tmp_path):
    path = tmp_path / "M3D_VQA_test.csv"
    path.write_text("Image Path,Text,Question Type,Question,Choice A,Choice B,Choice C,Choice D,Answer,Answer Choice\n"
                    "a/b.nii.gz,t,2,Which phase?,Arterial,Non-contrast,Venous,Delayed,Non-contrast,B\n")
    (row,) = read_records(path)
    assert row["image"] == "a/b.nii.gz" and row["choices"][1] == "Non-contrast" and row["answer_choice"] == "B"
    assert row["question_type"] == "2" and row["id"] == "0"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    rows = []
    for seed in (3, 4, 5):
        phantom = generate_phantom(seed, shape=(32, 32, 32))
        phantom.save(root / f"p{seed}")
        rows.append({"id": f"p{seed}", "image": f"p{seed}/image.nii.gz",
                     "reference": f"FINDINGS: liver lesion {seed}. IMPRESSION: normal"})
    (root / "manifest.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def test_eval_report_generates_with_the_default_vlm_then_scores(cases, tmp_path):
    out = tmp_path / "gen"
    code = main(["eval-report", "--model", "default", "--data", str(cases / "manifest.jsonl"), "--limit", "2",
                 "--greedy", "--max-new-tokens", "24", "--device", "cpu", "--metrics", "bleu1", "rouge1",
                 "--out", str(out)])
    assert code == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [p["id"] for p in predictions] == ["p3", "p4"] and all(p["prediction"] for p in predictions)
    rows = read_csv(out / "report_scores.csv")
    for prediction, row in zip(predictions, rows):
        assert float(row["bleu1"]) == pytest.approx(bleu1(prediction["prediction"], prediction["reference"]), abs=1e-6)


def make_siglip(folder):
    """A random tiny DCFormer_SigLIP in the published folder layout (nano vision tower, one-layer DistilBERT)."""
    from transformers import BertTokenizerFast, DistilBertConfig

    from voxtext.models.dcformer import med3dvlm_config
    from voxtext.models.siglip import DCFormerSigLIP, SigLIPConfig

    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "liver", "lesion", *letters, *(f"##{c}" for c in letters)]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(folder / "vocab.txt")).save_pretrained(folder)
    text = DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=1, n_heads=2, hidden_dim=64,
                            max_position_embeddings=64)
    text.save_pretrained(folder / "text_encoder")
    config = SigLIPConfig(hidden_size=16, language_model_name_or_path="text_encoder")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "dec_clip", "loss_type": "sigmoid", "hidden_size": 16, "t_prime": config.t_prime,
        "bias": config.bias, "language_model_name_or_path": "text_encoder", "input_size": [32, 32, 32],
        "vision_variant": "nano"}))
    torch.manual_seed(1)
    model = DCFormerSigLIP(config, text, med3dvlm_config("nano"))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def test_eval_retrieval_cli(cases, tmp_path):
    from voxtext.findings import FindingsRanker

    model = make_siglip(tmp_path / "siglip")
    out = tmp_path / "retrieval"
    assert main(["eval-retrieval", "--model", str(model), "--data", str(cases / "manifest.jsonl"), "--sizes", "2",
                 "1000", "--device", "cpu", "--out", str(out)]) == 0
    rows = read_csv(out / "retrieval.csv")
    assert [r["N"] for r in rows] == ["2", "3"]  # 1000 is more than there is: all 3 pairs
    assert float(rows[1]["IR@5"]) == 1.0 and float(rows[1]["TR@10"]) == 1.0
    ranker = FindingsRanker(model, device="cpu")
    manifest = [json.loads(line) for line in (cases / "manifest.jsonl").read_text().splitlines()]
    with torch.no_grad():
        images = torch.cat([ranker.model.encode_image(ranker.prepare(cases / r["image"])) for r in manifest])
        texts = ranker.encode_findings([r["reference"] for r in manifest])
    expected = recall_at_k(images @ texts.T)
    assert float(rows[1]["IR@1"]) == pytest.approx(expected["image_to_text@1"], abs=1e-6)
    assert float(rows[1]["TR@1"]) == pytest.approx(expected["text_to_image@1"], abs=1e-6)


def test_eval_vqa_generates_closed_answers_with_the_default_vlm(cases, tmp_path):
    from voxtext.report import parse_choice

    choices = ["yes", "no", "uncertain", "not assessable"]
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(json.dumps({"id": f"q{i}", "image": str(cases / f"p{s}/image.nii.gz"), "question_type": 4,
                                          "question": "Is there a liver lesion?", "choices": choices,
                                          "answer": "yes", "answer_choice": "A"}) for i, s in enumerate((3, 4))))
    out = tmp_path / "vqa"
    assert main(["eval-vqa", "--model", "default", "--data", str(data), "--greedy", "--device", "cpu",
                 "--out", str(out)]) == 0
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    rows = read_csv(out / "vqa_closed.csv")
    for prediction, row in zip(predictions, rows):
        assert row["accuracy"] == ("1.000000" if parse_choice(prediction["prediction"], choices) == 0 else "0.000000")
    assert "Abnormality" in (out / "summary.md").read_text()

    scored = tmp_path / "vqa-scored"
    assert main(["eval-vqa", "--model", "default", "--data", str(data), "--score", "--device", "cpu",
                 "--out", str(scored)]) == 0
    predictions = [json.loads(line)["prediction"] for line in (scored / "predictions.jsonl").read_text().splitlines()]
    assert all(parse_choice(p, choices) is not None for p in predictions)  # a ranked choice is never unparseable
    assert [float(r["accuracy"]) for r in read_csv(scored / "vqa_closed.csv")] == \
        [float(parse_choice(p, choices) == 0) for p in predictions]
