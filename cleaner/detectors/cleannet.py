"""CleanNet (Lee et al., CVPR 2018): relevance of a sample to its label, learned from a
small human-verified subset and transferred to every class (docs/method.md, "CleanNet").

- Reference set of a class: `num_ref` k-means centres of the image embeddings labelled
  with it (on a uniform per-class sample of at most `ref_sample` rows).
- Class embedding phi_s: attention over the reference set (a learned context vector
  scores each reference; the softmax-weighted sum goes through a projection).
- Query embedding phi_q: a small encoder of the image embedding (with a reconstruction
  branch, an autoencoder's).
- Relevance = cos(phi_q, phi_s[label]). Training: verified rows pull the cosine to 1 when
  their label was verified right and push it below a margin when wrong; unverified rows
  do the same with a pseudo verdict (cos >= 0.1) at a small weight; plus reconstruction.
- The threshold on relevance is the most accurate one on held-out verified rows. Classes
  without any verified row are scored through the same encoders (the transfer).

Passes over the blocks sample each class (two passes: counts, then a uniform sample) and
collect the verified rows; one task fits the k-means per class group, one trains the
network on the verified rows and the class sample. The fitted detector is a few weight
matrices and the [K, 128] class embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cleaner.config import CleanNetConfig
from cleaner.detectors.blocks import Block, flatten, unit_rows
from cleaner.detectors.output import DetectorOutput
from cleaner.detectors.verified import VerifiedLabels
from cleaner.selection.probe_streaming import stable_hash

NAME = "cleannet"
QUERY_HIDDEN, EMBED, REF_HIDDEN, REF_ATTEND = 256, 128, 512, 256  # the official sizes
SAMPLE_MARGIN = 1.5  # rows kept per class in the first cut, over what the sample needs
MIN_HOLDOUT = 10  # fewer held-out verified rows than this: the threshold is fitted in-sample


# --------------------------------------------------------------------------------------
# Passes over the blocks: class counts, a per-class sample, the verified rows
# --------------------------------------------------------------------------------------


def class_counts(block: Block, num_classes: int) -> np.ndarray:
    return np.bincount(block["label"], minlength=num_classes)


def sample_priority(block: Block, seed: int) -> np.ndarray:
    """U[0, 1) per row from its key: the same rows are sampled however blocks are grouped."""
    return stable_hash(block["key_hash"].view(np.int64), seed=seed).astype(np.float64) / 2.0**64


def sample_candidates(block: Block, keep: np.ndarray, groups: int, seed: int) -> list[dict]:
    """Rows whose priority is under their class's cut `keep[label]`, split by class group."""
    priority = sample_priority(block, seed)
    chosen = priority < keep[block["label"]]
    parts = []
    for g in range(groups):
        rows = np.flatnonzero(chosen & (block["label"] % groups == g))
        parts.append(
            {
                "priority": priority[rows],
                "label": block["label"][rows],
                "embedding": block["embedding"][rows],
            }
        )
    return parts


def verified_rows(block: Block, verified: dict[str, int]) -> list[dict]:
    """(found keys, rows) of the block's rows whose key is verified."""
    rows = np.array([i for i, key in enumerate(block["key"]) if key in verified], dtype=np.int64)
    keys = block["key"][rows]
    found = {"keys": keys.astype(str)}
    data = {
        "label": block["label"][rows],
        "verified_label": np.array([verified[k] for k in keys], dtype=np.int64),
        "embedding": block["embedding"][rows],
    }
    return [found, data]


def concat_parts(*items) -> dict:
    """One dict of arrays from partition items (dicts, or lists of them)."""
    parts = [p for p in flatten(items) if len(next(iter(p.values())))]
    if not parts:
        return {}
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def class_samples_and_references(
    cfg: CleanNetConfig, num_classes: int, dim: int, seed: int, *items
) -> dict:
    """Reduce one class group: each class's sample (the ref_sample lowest priorities) and
    its k-means reference set; classes not in the group stay absent."""
    from sklearn.cluster import KMeans

    rows = concat_parts(*items)
    out: dict = {"references": {}, "samples": {}}
    if not rows:
        return out
    for k in np.unique(rows["label"]):
        mine = np.flatnonzero(rows["label"] == k)
        mine = mine[np.argsort(rows["priority"][mine], kind="stable")[: cfg.ref_sample]]
        points = unit_rows(rows["embedding"][mine])
        out["samples"][int(k)] = rows["embedding"][mine]
        if len(points) <= cfg.num_ref:
            centres = points[np.arange(cfg.num_ref) % len(points)]
        else:
            km = KMeans(
                n_clusters=cfg.num_ref, n_init=10, max_iter=50, tol=1e-4, random_state=seed
            ).fit(points)
            centres = km.cluster_centers_.astype(np.float32)
        out["references"][int(k)] = centres
    return out


# --------------------------------------------------------------------------------------
# The network (torch) and its training
# --------------------------------------------------------------------------------------


def build_network(dim: int, dropout: float):
    """The query encoder (with its reconstruction branch) and the reference-set encoder."""
    import torch
    from torch import nn

    class CleanNetModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query_in = nn.Linear(dim, QUERY_HIDDEN)
            self.query_out = nn.Linear(QUERY_HIDDEN, EMBED)
            self.recon_in = nn.Linear(EMBED, QUERY_HIDDEN)
            self.recon_out = nn.Linear(QUERY_HIDDEN, dim)
            self.ref_in = nn.Linear(dim, REF_HIDDEN)
            self.ref_hidden = nn.Linear(REF_HIDDEN, REF_ATTEND)
            self.ref_score = nn.Linear(REF_ATTEND, REF_ATTEND)
            self.context = nn.Parameter(torch.empty(REF_ATTEND))
            self.ref_out = nn.Linear(REF_ATTEND, EMBED)
            self.dropout = nn.Dropout(dropout)
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)
            bound = float(np.sqrt(6.0 / (REF_ATTEND + 1)))  # Xavier-uniform of a vector
            nn.init.uniform_(self.context, -bound, bound)

        def query(self, v):
            phi = torch.tanh(self.query_out(torch.tanh(self.query_in(v))))
            recon = torch.tanh(self.recon_out(torch.tanh(self.recon_in(phi))))
            return phi, recon

        def classes(self, refs):  # [K, R, D] -> [K, EMBED]
            h = torch.tanh(self.ref_hidden(self.dropout(torch.tanh(self.ref_in(refs)))))
            scores = (torch.tanh(self.ref_score(h)) * self.context).sum(dim=-1)
            alpha = torch.softmax(scores, dim=1).unsqueeze(-1)
            return torch.tanh(self.ref_out((alpha * h).sum(dim=1)))

    return CleanNetModule()


def relevance_loss(cos, verdict, neg_weight: float, margin: float):
    """Per row: verdict (1 - cos) + neg_weight (1 - verdict) max(0, cos - margin)."""
    import torch

    return verdict * (1.0 - cos) + neg_weight * (1.0 - verdict) * torch.clamp(cos - margin, min=0)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of the verified set."""
    order = np.random.default_rng(seed).permutation(n)
    held = round(n * fraction)
    if held < MIN_HOLDOUT or n - held < 1:
        return order, np.zeros(0, dtype=np.int64)
    return order[held:], order[:held]


def fit_threshold(cos: np.ndarray, verdict: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy): the cut on cos that best separates verified right / wrong."""
    order = np.sort(np.unique(cos))
    candidates = np.concatenate([[order[0] - 1e-6], (order[:-1] + order[1:]) / 2, [order[-1]]])
    best, best_acc = float(candidates[0]), -1.0
    for t in candidates:
        acc = float(np.mean((cos >= t) == verdict))
        if acc > best_acc:
            best, best_acc = float(t), acc
    return best, best_acc


def train_cleannet(
    cfg: CleanNetConfig,
    num_classes: int,
    dim: int,
    seed: int,
    verified: dict,
    *class_groups: dict,
) -> FittedCleanNet:
    """Train on the verified rows and the class samples; fit the relevance threshold."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    refs = np.zeros((num_classes, cfg.num_ref, dim), dtype=np.float32)
    samples: dict[int, np.ndarray] = {}
    for group in class_groups:
        for k, centres in group["references"].items():
            refs[k] = centres
        samples.update({k: unit_rows(v) for k, v in group["samples"].items()})
    queries = unit_rows(verified["embedding"])
    verdict = (verified["label"] == verified["verified_label"]).astype(np.float32)
    labels = verified["label"]
    train_rows, held_rows = split_holdout(len(labels), cfg.holdout_fraction, seed)

    net = build_network(dim, cfg.dropout)
    decay = [p for p in net.parameters() if p.ndim >= 2]
    rest = [p for p in net.parameters() if p.ndim < 2]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest}],
        lr=cfg.lr,
        momentum=cfg.momentum,
    )
    schedule = torch.optim.lr_scheduler.StepLR(optimizer, max(1, cfg.steps // 2), gamma=0.1)
    refs_t = torch.from_numpy(refs)
    sampled_classes = np.array(sorted(samples), dtype=np.int64)
    order, cursor = rng.permutation(train_rows), 0
    for _ in range(cfg.steps):
        if cursor + cfg.batch_verified > len(order):
            order, cursor = rng.permutation(train_rows), 0
        take = order[cursor : cursor + cfg.batch_verified]
        cursor += cfg.batch_verified
        q = [queries[take]]
        y = [labels[take]]
        flags = [np.ones(len(take), dtype=np.float32)]
        v = [verdict[take]]
        if cfg.batch_unverified and len(sampled_classes):
            classes = rng.choice(sampled_classes, cfg.batch_unverified)
            q.append(np.stack([samples[k][rng.integers(len(samples[k]))] for k in classes]))
            y.append(classes)
            flags.append(np.zeros(len(classes), dtype=np.float32))
            v.append(np.zeros(len(classes), dtype=np.float32))
        q_t = torch.from_numpy(np.concatenate(q))
        flag_t = torch.from_numpy(np.concatenate(flags))
        phi_q, recon = net.query(q_t)
        present, where = np.unique(np.concatenate(y), return_inverse=True)
        phi_s = net.classes(refs_t[torch.from_numpy(present)])[torch.from_numpy(where)]
        cos = torch.nn.functional.cosine_similarity(phi_q, phi_s, dim=1)
        pseudo = (cos.detach() >= cfg.unsupervised_threshold).float()
        supervised = relevance_loss(
            cos, torch.from_numpy(np.concatenate(v)), cfg.neg_weight, cfg.margin
        )
        unsupervised = relevance_loss(cos, pseudo, cfg.neg_weight, cfg.margin)
        loss = (
            flag_t * supervised
            + cfg.reconstruction_weight * ((q_t - recon) ** 2).sum(dim=1)
            + cfg.unsupervised_weight * (1.0 - flag_t) * unsupervised
        ).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()

    net.eval()
    with torch.no_grad():
        class_embeddings = net.classes(refs_t).numpy()
    fitted = FittedCleanNet(
        weights={
            name: getattr(net, name).weight.detach().numpy().T.copy()
            for name in ("query_in", "query_out")
        },
        biases={
            name: getattr(net, name).bias.detach().numpy().copy()
            for name in ("query_in", "query_out")
        },
        class_embeddings=class_embeddings,
        threshold=0.0,
        verified={},
    )
    calibration_rows = held_rows if len(held_rows) else train_rows
    cos_cal = fitted.relevance(queries[calibration_rows], labels[calibration_rows])
    if cfg.threshold == "fit":
        threshold, accuracy = fit_threshold(cos_cal, verdict[calibration_rows] > 0.5)
    else:
        threshold = float(cfg.threshold)
        accuracy = float(np.mean((cos_cal >= threshold) == (verdict[calibration_rows] > 0.5)))
    return FittedCleanNet(
        weights=fitted.weights,
        biases=fitted.biases,
        class_embeddings=class_embeddings,
        threshold=threshold,
        verified={},
        calibration={
            "verified_rows": len(labels),
            "training_rows": len(train_rows),
            "threshold_rows": len(calibration_rows),
            "threshold_in_sample": bool(len(held_rows) == 0),
            "threshold_accuracy": accuracy,
            "verified_classes": len(np.unique(labels)),
        },
    )


# --------------------------------------------------------------------------------------
# The fitted detector
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FittedCleanNet:
    """The query encoder's weights, the class embeddings, the threshold (a few hundred KB)
    and the verified labels (key -> label), which the manifest can trust outright."""

    weights: dict[str, np.ndarray]
    biases: dict[str, np.ndarray]
    class_embeddings: np.ndarray  # float32 [K, EMBED]
    threshold: float
    verified: dict[str, int]
    trust_verified: bool = True
    calibration: dict | None = None

    name = NAME

    def with_verified(self, verified: VerifiedLabels, trust: bool) -> FittedCleanNet:
        return FittedCleanNet(
            self.weights,
            self.biases,
            self.class_embeddings,
            self.threshold,
            dict(verified.labels),
            trust,
            self.calibration,
        )

    def query_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        v = unit_rows(embeddings)
        hidden = np.tanh(v @ self.weights["query_in"] + self.biases["query_in"])
        return np.tanh(hidden @ self.weights["query_out"] + self.biases["query_out"])

    def relevance(self, embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """cos(phi_q(x), phi_s[label]) per row (float32)."""
        phi_q = self.query_embeddings(embeddings)
        phi_s = self.class_embeddings[np.asarray(labels, dtype=np.int64)]
        num = (phi_q * phi_s).sum(axis=1)
        den = np.linalg.norm(phi_q, axis=1) * np.linalg.norm(phi_s, axis=1)
        return (num / np.maximum(den, 1e-8)).astype(np.float32)

    def evaluate(
        self, embeddings: np.ndarray, labels: np.ndarray, keys: np.ndarray | None = None
    ) -> DetectorOutput:
        """Clean when relevance >= threshold; verified rows keep their verdict when trusted."""
        relevance = self.relevance(embeddings, labels)
        is_clean = relevance >= self.threshold
        verified_label = np.full(len(labels), -1, dtype=np.int64)
        suggested = np.full(len(labels), -1, dtype=np.int64)
        confidence = np.full(len(labels), np.nan, dtype=np.float32)
        if keys is not None and self.verified:
            for i, key in enumerate(keys):
                verified_label[i] = self.verified.get(str(key), -1)
            known = verified_label >= 0
            if self.trust_verified:
                is_clean = np.where(known, verified_label == labels, is_clean)
                suggested[known] = verified_label[known]
                confidence[known] = 1.0
        return DetectorOutput(
            is_clean=is_clean,
            clean_score=relevance,
            suggested=suggested if (suggested >= 0).any() else None,
            confidence=confidence,
            columns={"cleannet_relevance": relevance, "cleannet_verified_label": verified_label},
        )

    def as_dict(self) -> dict:
        return {"threshold": self.threshold, **(self.calibration or {})}
