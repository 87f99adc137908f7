"""Parity with the official CLIPCleaner selection, reimplemented here with scikit-learn.

The reference (`official_selection`) is the authors' per-class selection in a few lines:
per source, log p(label) min-max normalised within each class, `GaussianMixture(2)` with
every default (reg_covar 1e-6, tol 1e-3, max_iter 100, k-means init, one init), p_clean =
posterior of the larger-mean component >= theta_gmm, consistency p(label) / max p >=
theta_cons, and the intersection over the sources. It shares no code with `cleaner`.

Both the library (`select_clean`) and the clean job's manifest (the in-memory fit and
the Ray Data fit) must agree with it: Jaccard >= 0.99 on the clean sets.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture
from threadpoolctl import threadpool_limits

from cleaner import select_clean
from cleaner.noise import inject_noise
from cleaner.selection.rules import SourceScores
from cleaner.selection.select import select_from_scores

MIN_JACCARD = 0.99


def official_selection(
    labels: np.ndarray,
    sources: list[tuple[np.ndarray, np.ndarray]],
    theta_gmm: float = 0.5,
    theta_cons: float = 0.8,
    reg_covar: float = 1e-6,
    random_state: int = 0,
) -> np.ndarray:
    """The official per-class selection on (p_label, max_p) per source (its k-means++
    initialisation drawn with random_state)."""
    keep = np.ones(labels.shape[0], dtype=bool)
    for p_label, max_p in sources:
        log_p = np.log(np.clip(p_label, 1e-12, None))
        p_clean = np.zeros(labels.shape[0])
        for k in np.unique(labels):
            rows = labels == k
            x = log_p[rows]
            x = ((x - x.min()) / (x.max() - x.min()))[:, None]
            gmm = GaussianMixture(2, reg_covar=reg_covar, random_state=random_state)
            # one thread: k-means' OpenMP pool is ~10x slower on a busy 2-core machine
            with warnings.catch_warnings(), threadpool_limits(1):
                warnings.simplefilter("ignore", ConvergenceWarning)
                gmm.fit(x)
            p_clean[rows] = gmm.predict_proba(x)[:, gmm.means_.argmax()]
        keep &= (p_clean >= theta_gmm) & (p_label / max_p >= theta_cons)
    return keep


def compact(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = probs / probs.sum(axis=1, keepdims=True)
    return probs[np.arange(labels.shape[0]), labels], probs.max(axis=1)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# --------------------------------------------------------------------------- synthetic


NUM_CLASSES = 10


def _probs(true: np.ndarray, signal: float, rng: np.random.Generator) -> np.ndarray:
    """Probabilities [N, K] that favour the true class, with per-sample difficulty."""
    logits = rng.normal(0.0, 1.0, (true.shape[0], NUM_CLASSES))
    logits[np.arange(true.shape[0]), true] += signal + rng.normal(0.0, 1.5, true.shape[0])
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    return probs / probs.sum(axis=1, keepdims=True)


def _noisy_labels(kind: str, true: np.ndarray, zeroshot: np.ndarray, rng) -> np.ndarray:
    """symmetric 40%, asymmetric 40% (class k -> k+1), or instance-dependent 40% (each
    flipped sample goes to the class its zero-shot probabilities rank next)."""
    if kind == "symmetric":
        return inject_noise(true, "symmetric", 0.4, NUM_CLASSES, rng)
    if kind == "asymmetric":
        pairs = {k: (k + 1) % NUM_CLASSES for k in range(NUM_CLASSES)}
        return inject_noise(true, "asymmetric", 0.4, NUM_CLASSES, rng, pairs=pairs)
    masked = zeroshot.copy()
    masked[np.arange(true.shape[0]), true] = -1.0
    return inject_noise(true, "hard", 0.4, NUM_CLASSES, rng, most_similar=masked.argmax(axis=1))


@pytest.fixture(scope="module", params=["symmetric", "asymmetric", "instance"])
def synthetic(request):
    """(noisy labels, zero-shot probs, probe probs) for one noise pattern."""
    rng = np.random.default_rng(11)
    true = rng.permutation(np.arange(3000) % NUM_CLASSES)
    zeroshot = _probs(true, 3.0, rng)
    probe = _probs(true, 4.0, rng)
    return _noisy_labels(request.param, true, zeroshot, rng), zeroshot, probe


@pytest.mark.parametrize("with_probe", [False, True], ids=["zeroshot", "probe"])
def test_select_clean_matches_the_official_selection(synthetic, with_probe: bool) -> None:
    labels, zeroshot, probe = synthetic
    probs = [zeroshot, probe] if with_probe else [zeroshot]
    reference = official_selection(labels, [compact(labels, p) for p in probs])
    ours = select_clean(labels, *probs)
    assert 0.2 * labels.shape[0] < reference.sum() < 0.8 * labels.shape[0]
    assert jaccard(ours, reference) >= MIN_JACCARD


def test_the_dividemix_floor_matches_the_official_code_run_with_it(synthetic) -> None:
    labels, zeroshot, probe = synthetic
    reference = official_selection(
        labels, [compact(labels, p) for p in (zeroshot, probe)], reg_covar=5e-4
    )
    ours = select_clean(labels, zeroshot, probe, reg_covar=5e-4)
    assert jaccard(ours, reference) >= MIN_JACCARD


def test_the_variance_floor_changes_the_selection(synthetic) -> None:
    """1e-6 and 5e-4 are different selections (so the default is a real choice)."""
    labels, zeroshot, _ = synthetic
    faithful = select_clean(labels, zeroshot)
    dividemix = select_clean(labels, zeroshot, reg_covar=5e-4)
    assert not np.array_equal(faithful, dividemix)


def test_tiny_and_tied_classes_are_numerically_safe_with_the_tiny_floor() -> None:
    """Two-sample classes, two-valued classes, a heap of ties at the top and one outlier:
    finite posteriors in [0, 1], no floating-point warning, and the official answer."""
    rng = np.random.default_rng(5)
    blocks = [
        np.array([0.9, 0.1]),  # two samples
        np.repeat([0.95, 0.2], [30, 10]),  # two distinct values
        np.concatenate((np.full(60, 0.999), [0.01])),  # ties at the top, one outlier
        np.concatenate((np.full(25, 0.7), rng.uniform(0.01, 0.3, 25))),
        rng.uniform(0.05, 1.0, 3),  # three samples
    ]
    labels = np.concatenate([np.full(b.shape[0], k) for k, b in enumerate(blocks)])
    p_label = np.concatenate(blocks)
    sources = {"zeroshot": SourceScores(p_label=p_label, max_p=p_label.copy())}
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        result = select_from_scores(labels, len(blocks), sources, theta_cons=0.0)
    p_clean = result.sources["zeroshot"].gmm_p_clean
    assert np.isfinite(p_clean).all() and (p_clean >= 0).all() and (p_clean <= 1).all()
    assert result.settings["reg_covar"] == 1e-6
    reference = official_selection(labels, [(p_label, p_label)], theta_cons=0.0)
    assert np.array_equal(result.is_clean, reference)


# --------------------------------------------------------------------------- the clean job


@pytest.fixture(scope="module")
def job_runs(local_ray, demo_shards, tmp_path_factory):
    """Per noise pattern (symmetric 40%: the conftest's demo shards; hard 40%): one scored
    run with the in-sample probe, in memory. Other fits reuse its scores."""
    from cleaner.demo.dataset import write_demo_shards
    from jobs.clean import run_clean
    from tests.conftest import clean_config

    hard = tmp_path_factory.mktemp("hard") / "train"
    write_demo_shards(hard, 400, samples_per_shard=100, noise="hard", noise_rate=0.4, seed=7)
    runs = {}
    for name, shards in (("symmetric", demo_shards), ("hard", hard)):
        out = tmp_path_factory.mktemp(f"parity-{name}") / "probe"
        run_clean(clean_config(str(shards), str(out), "selection.fit_mode=in_memory"))
        runs[name] = (shards, out)
    return runs


OFFICIAL_SEEDS = 5  # random_states of the official fit that measure its own spread


def _manifest_parity(manifest_path, with_probe: bool) -> tuple[float, float, int]:
    """(Jaccard of the manifest's selection with the official one at random_state 0, the
    bound it must reach, the official selection's size).

    The bound is MIN_JACCARD, or lower where the official selection itself moves more
    than that with its random_state: on the job tests' 400 samples (about 40 per class),
    hard noise with the probe source, random_states 0-4 agree with 0 at Jaccard 0.94-0.96
    only. Ours must then be as close to the official as the official is to itself.
    """
    table = pq.read_table(manifest_path)
    ok = np.asarray(table.column("status").to_pylist(), dtype=object) != "failed"
    labels = table.column("label").to_numpy()[ok]
    sources = [
        (
            table.column(f"p_label_{s}").to_numpy()[ok].astype(np.float64),
            table.column(f"max_p_{s}").to_numpy()[ok].astype(np.float64),
        )
        for s in (("zeroshot", "probe") if with_probe else ("zeroshot",))
    ]
    references = [
        official_selection(labels, sources, random_state=seed) for seed in range(OFFICIAL_SEEDS)
    ]
    spread = min(jaccard(references[0], other) for other in references[1:])
    ours = table.column("is_clean").to_numpy()[ok]
    return jaccard(ours, references[0]), min(MIN_JACCARD, spread), int(references[0].sum())


# The distributed fit is not re-checked here: test_fit_modes asserts that its manifest
# equals the in-memory one column by column, so it inherits the in-memory parity below.
@pytest.mark.integration
@pytest.mark.parametrize("noise", ["symmetric", "hard"])
@pytest.mark.parametrize(
    "extra",
    [(), ("selection.probe=none",)],
    ids=["probe-in-memory", "zeroshot-in-memory"],
)
def test_the_job_manifest_matches_the_official_selection(job_runs, noise, extra, tmp_path):
    from jobs.clean import run_clean
    from tests.conftest import clean_config

    shards, scored = job_runs[noise]
    if extra:
        out = tmp_path / "refit"
        shutil.copytree(scored / "scores", out / "scores")
        summary = run_clean(clean_config(str(shards), str(out), *extra))
        assert summary["scoring"]["shards_scored"] == 0
    else:
        out = scored
    similarity, bound, reference_size = _manifest_parity(
        out / "manifest.parquet", with_probe="selection.probe=none" not in extra
    )
    assert reference_size > 50
    assert bound >= 0.9  # the official selection is not noise (checked, not assumed)
    assert similarity >= bound, (similarity, bound)
