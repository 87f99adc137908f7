"""DeFT (Wei et al., NeurIPS 2024): a positive and a negative learned prompt per class;
a sample is clean when its image is closer to its label's positive prompt than to its
negative one (docs/method.md, "DeFT").

The prompts are CoOp-style context vectors fed through the frozen CLIP text tower:
"[SOS] ctx_1 ... ctx_M <class name>. [EOS]". Here they are trained on the score files'
stored image embeddings (the image tower frozen), with the official objective:

- positives: cross-entropy of the positive-prompt classifier over the samples the
  detector currently takes as clean (every sample during warm-up);
- negatives (the learnable threshold): for each sample, its label's positive prompt must
  beat the negative one (-log p_yes[y], y the label, or the positive classifier's
  prediction for a sample not taken as clean after warm-up), and a random other class's
  negative prompt must beat the positive one (-log p_no[c]); p_yes[k] = sigmoid(s *
  (cos(x, pos_k) - cos(x, neg_k))), the positive logit detached.

Who does what: a `PromptTrainer` (a Ray actor; a GPU when the scorers have them) holds the
text tower, the context vectors and the optimiser. Each step it encodes the K x 2 prompts;
Ray tasks over the embedding blocks return the gradient of the loss with respect to those
[K, D] text features (`deft_partial`); the trainer backpropagates their sum through the
text tower and steps. Only [K, D] arrays move; the driver only sequences the steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cleaner.config import ConfigError, DeftConfig, ModelConfig
from cleaner.detectors.blocks import Block, flatten, unit_rows
from cleaner.detectors.output import DetectorOutput, softmax_rows
from cleaner.selection.probe_streaming import stable_hash

NAME = "deft"
PLACEHOLDER = "X"  # the context positions' token before the learned vectors replace it
CLAMP_MIN = 1e-5  # log-probabilities are clamped as in the official code
CHUNK_ROWS = 8192


# --------------------------------------------------------------------------------------
# The objective (torch; shared by the embedding trainer and the image-tuning trainer)
# --------------------------------------------------------------------------------------


def deft_objective(pos_logits, neg_logits, labels, complementary, *, warmup: bool, require_argmax):
    """Sums of DeFT's two losses over a batch, and which samples it takes as clean.

    pos_logits, neg_logits: [n, K] (scale * cosine with the positive / negative prompts);
    labels, complementary: int64 [n] (a random class other than the label).
    Returns (cls_sum, cls_count, neg_sum, selected bool[n]); the batch's loss is
    cls_sum / cls_count + neg_sum / n (a mean of each, as the official code).
    """
    import torch
    import torch.nn.functional as F

    rows = torch.arange(labels.shape[0], device=labels.device)
    p_yes = torch.sigmoid(pos_logits.detach() - neg_logits)
    p_no = torch.sigmoid(neg_logits - pos_logits.detach())
    selected = p_yes.detach()[rows, labels] > 0.5
    if require_argmax:
        selected &= p_yes.detach().argmax(dim=1) == labels
    cross_entropy = F.cross_entropy(pos_logits, labels, reduction="none")
    if warmup:
        cls_sum, cls_count, pseudo = cross_entropy.sum(), int(labels.shape[0]), labels
    else:
        cls_sum, cls_count = cross_entropy[selected].sum(), int(selected.sum())
        pseudo = torch.where(selected, labels, pos_logits.detach().argmax(dim=1))
    log_no = torch.log(torch.clamp(p_no[rows, complementary], min=CLAMP_MIN, max=1.0))
    log_yes = torch.log(torch.clamp(p_yes[rows, pseudo], min=CLAMP_MIN, max=1.0))
    neg_sum = -(log_no.sum() + log_yes.sum())
    return cls_sum, cls_count, neg_sum, selected


def step_uniforms(key_hash: np.ndarray, seed: int, step: int, stream: int) -> np.ndarray:
    """U[0, 1) per sample for (seed, step, stream), from its key: any grouping of blocks
    draws the same numbers."""
    salt = (seed * 1_000_003 + step * 4 + stream) % (2**62)
    return stable_hash(key_hash.view(np.int64), seed=salt).astype(np.float64) / 2.0**64


def complementary_labels(labels: np.ndarray, num_classes: int, uniforms: np.ndarray) -> np.ndarray:
    """A class other than the label, uniformly (the official code's complementary target)."""
    if num_classes < 2:
        return labels.copy()
    offset = 1 + np.minimum((uniforms * (num_classes - 1)).astype(np.int64), num_classes - 2)
    return (labels + offset) % num_classes


def deft_partial(
    block: Block,
    state: dict,
    step: int,
    warmup: bool,
    fraction: float,
    require_argmax: bool,
    seed: int,
) -> dict:
    """One block's share of a step: the gradients of the loss sums with respect to the
    normalised positive / negative text features, and the counts to average them by."""
    import torch

    pos = torch.tensor(state["positive"], requires_grad=True)
    neg = torch.tensor(state["negative"], requires_grad=True)
    num_classes = pos.shape[0]
    key_hash = block_key_hash(block)
    rows = np.flatnonzero(step_uniforms(key_hash, seed, step, 0) < fraction)
    out = {"cls_sum": 0.0, "cls_count": 0, "neg_sum": 0.0, "n": 0, "selected": 0}
    for start in range(0, len(rows), CHUNK_ROWS):
        part = rows[start : start + CHUNK_ROWS]
        labels = block["label"][part]
        other = complementary_labels(
            labels, num_classes, step_uniforms(key_hash[part], seed, step, 1)
        )
        images = torch.from_numpy(unit_rows(block["embedding"][part]))
        cls_sum, cls_count, neg_sum, selected = deft_objective(
            state["scale"] * images @ pos.T,
            state["scale"] * images @ neg.T,
            torch.from_numpy(labels),
            torch.from_numpy(other),
            warmup=warmup,
            require_argmax=require_argmax,
        )
        (cls_sum + neg_sum).backward()
        out["cls_sum"] += float(cls_sum.detach())
        out["cls_count"] += cls_count
        out["neg_sum"] += float(neg_sum.detach())
        out["n"] += len(part)
        out["selected"] += int(selected.sum())
    zero = np.zeros(tuple(pos.shape), dtype=np.float32)
    out["grad_positive"] = pos.grad.numpy() if pos.grad is not None else zero
    out["grad_negative"] = neg.grad.numpy() if neg.grad is not None else zero
    return out


def block_key_hash(block: Block) -> np.ndarray:
    """A uint64 hash per row's key (computed once per block and kept with it)."""
    if "key_hash" not in block:
        block["key_hash"] = stable_hash(block["key"].astype(str))
    return block["key_hash"]


def sum_partials(partials) -> dict:
    """The sum of block partials (lists of them, as Ray groups return, are flattened)."""
    flat = flatten(partials)
    total = dict(flat[0])
    for part in flat[1:]:
        for name, value in part.items():
            total[name] = total[name] + value
    return total


# --------------------------------------------------------------------------------------
# Learned prompts through the CLIP text tower
# --------------------------------------------------------------------------------------


def text_token_embedding(model):
    """The token embedding of an open_clip text tower (CLIP or CustomTextCLIP)."""
    embedding = getattr(model, "token_embedding", None)
    if embedding is None:
        embedding = getattr(getattr(model, "text", None), "token_embedding", None)
    if embedding is None:
        raise ConfigError(
            "selection.detector=deft: the model's text tower takes no learned context "
            "(it needs a CLIP-style transformer with a token embedding)"
        )
    return embedding


def context_length_fit(tokenizer, class_names: list[str], wanted: int) -> int:
    """Context tokens that fit the tokenizer's length beside SOS, the longest name, '.', EOS."""
    tokens = tokenizer([f"{name.replace('_', ' ')}." for name in class_names])
    name_tokens = int(tokens.argmax(dim=1).max()) - 1  # EOS is the largest id
    fit = tokens.shape[1] - 2 - name_tokens
    if fit < 1:
        raise ConfigError(
            f"selection.detector=deft: the text tower's context ({tokens.shape[1]} tokens) "
            "holds no learned context beside the longest class name"
        )
    return min(wanted, fit)


def template_embeddings(clip, template: str):
    """The token embeddings [m, width] of a context template ("a photo of a": m = 4),
    without SOS / EOS (CoOp's ctx_init)."""
    import torch

    tokens = clip.tokenizer([template.replace("_", " ")])
    count = int(tokens.argmax(dim=1)[0]) - 1  # EOS is the largest id
    if count < 1:
        raise ConfigError(f"selection.deft.ctx_init={template!r} has no tokens")
    embedding = text_token_embedding(clip.model)
    with torch.no_grad():
        vectors = embedding(tokens.to(embedding.weight.device))[0, 1 : 1 + count]
    return vectors.detach().float().cpu()


class PromptLearner:
    """Positive and negative context vectors and the frozen CLIP that encodes them."""

    def __init__(self, clip, class_names: list[str], cfg: DeftConfig, seed: int) -> None:
        import torch

        self.clip = clip
        self.model = clip.model
        self.embedding = text_token_embedding(self.model)
        template = template_embeddings(clip, cfg.ctx_init) if cfg.ctx_init.strip() else None
        wanted = cfg.n_ctx if template is None else template.shape[0]
        self.n_ctx = context_length_fit(clip.tokenizer, class_names, wanted)
        if template is not None and self.n_ctx < wanted:
            raise ConfigError(
                f"selection.deft.ctx_init={cfg.ctx_init!r}: its {wanted} tokens and the longest "
                f"class name exceed the text tower's context (room for {self.n_ctx})"
            )
        prefix = " ".join([PLACEHOLDER] * self.n_ctx)
        self.tokens = clip.tokenizer(
            [f"{prefix} {name.replace('_', ' ')}." for name in class_names]
        ).to(clip.device)
        width = self.embedding.weight.shape[1]
        shape = (len(class_names), self.n_ctx, width) if cfg.class_specific else (self.n_ctx, width)
        # the official code draws both contexts ~ N(0, init_std); with a template, the
        # positive one starts at CLIP's zero-shot prompt instead (docs/method.md, "DeFT")
        generator = torch.Generator().manual_seed(seed)
        positive = torch.randn(shape, generator=generator) * cfg.init_std
        negative = torch.randn(shape, generator=generator) * cfg.init_std
        if template is not None:
            positive = template.expand(shape).clone()
        self.positive = torch.nn.Parameter(positive.to(clip.device))
        self.negative = torch.nn.Parameter(negative.to(clip.device))
        self.scale = float(self.model.logit_scale.exp())

    def parameters(self) -> list:
        return [self.positive, self.negative]

    def encode(self, context):
        """Normalised text features [K, D] of the prompts with this context (differentiable)."""
        import torch

        n = self.n_ctx

        def splice(module, inputs, output):
            ctx = context if context.dim() == 3 else context.expand(output.shape[0], -1, -1)
            return torch.cat([output[:, :1], ctx.to(output.dtype), output[:, 1 + n :]], dim=1)

        handle = self.embedding.register_forward_hook(splice)
        try:
            features = self.model.encode_text(self.tokens)
        finally:
            handle.remove()
        return torch.nn.functional.normalize(features.float(), dim=-1)

    def state_dict(self) -> dict:
        return {"positive": self.positive.detach().cpu(), "negative": self.negative.detach().cpu()}


class PromptTrainer:
    """The DeFT prompts' optimisation on one process (a Ray actor in the job)."""

    def __init__(
        self,
        model_config: dict,
        class_names: list[str],
        cfg: dict,
        seed: int = 0,
        device: str | None = None,
    ) -> None:
        import torch

        from cleaner.scoring.models import load_clip

        self.cfg = DeftConfig(**cfg)
        torch.manual_seed(seed)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.prompts = PromptLearner(
            load_clip(ModelConfig(**model_config), device=device), class_names, self.cfg, seed
        )
        self.optimizer = torch.optim.AdamW(
            self.prompts.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay
        )
        self.steps_done = 0
        self.graph = None
        self.history: list[dict] = []

    def text_state(self) -> dict:
        """The current normalised text features (numpy) and the logit scale."""
        positive = self.prompts.encode(self.prompts.positive)
        negative = self.prompts.encode(self.prompts.negative)
        self.graph = (positive, negative)
        return {
            "positive": positive.detach().cpu().numpy(),
            "negative": negative.detach().cpu().numpy(),
            "scale": self.prompts.scale,
        }

    def step(self, *partials) -> dict:
        """Backpropagate the blocks' summed gradients through the text tower; one step."""
        import torch

        if self.graph is None:
            raise RuntimeError("step() before text_state()")
        total = sum_partials(partials)
        device = self.prompts.positive.device
        grad_positive = torch.tensor(np.asarray(total["grad_positive"]), device=device)
        grad_negative = torch.tensor(np.asarray(total["grad_negative"]), device=device)
        self.optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(
            list(self.graph),
            [grad_positive / max(total["cls_count"], 1), grad_negative / max(total["n"], 1)],
        )
        lr = cosine_lr(self.cfg.lr, self.steps_done, self.cfg.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.graph = None
        self.steps_done += 1
        record = {
            "step": self.steps_done,
            "loss": total["cls_sum"] / max(total["cls_count"], 1)
            + total["neg_sum"] / max(total["n"], 1),
            "selected_fraction": total["selected"] / max(total["n"], 1),
            "lr": lr,
        }
        self.history.append(record)
        return record

    def fitted(self) -> FittedDeft:
        """The trained prompts' text features, ready to score any embedding."""
        import torch

        with torch.no_grad():
            state = self.text_state()
        self.graph = None
        return FittedDeft(
            positive=state["positive"],
            negative=state["negative"],
            scale=state["scale"],
            require_argmax=self.cfg.require_argmax,
            n_ctx=self.prompts.n_ctx,
            history=self.history[-1:] if self.history else [],
        )


def cosine_lr(base: float, step: int, steps: int) -> float:
    """Cosine annealing from base to 0 over the steps (the official schedule, per step)."""
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(steps, 1)))


# --------------------------------------------------------------------------------------
# The fitted detector
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class FittedDeft:
    """Learned positive / negative text features [K, D] and the logit scale (a few KB)."""

    positive: np.ndarray
    negative: np.ndarray
    scale: float
    require_argmax: bool = False
    n_ctx: int = 0
    history: list | None = None
    tuned: dict[str, str] | None = None  # shard -> its tuned-tower embeddings (image tuning)

    name = NAME

    def tuned_embeddings(self, shards: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """The tuned image tower's embeddings of rows given by (shard, position)."""
        import pyarrow.parquet as pq

        from cleaner.reading import uri as uri_lib
        from cleaner.selection.score_table import embeddings_of

        out: np.ndarray | None = None
        for shard in dict.fromkeys(shards.tolist()):
            fs, path = uri_lib.resolve(self.tuned[shard])
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=["shard_pos", "embedding"])
            row_of = {int(p): i for i, p in enumerate(table.column("shard_pos").to_pylist())}
            values = embeddings_of(table)
            if out is None:
                out = np.zeros((len(shards), values.shape[1]), dtype=values.dtype)
            mine = np.flatnonzero(shards == shard)
            out[mine] = values[[row_of[int(p)] for p in positions[mine]]]
        return out if out is not None else np.zeros((0, len(self.positive[0])), np.float16)

    def evaluate(self, embeddings: np.ndarray, labels: np.ndarray) -> DetectorOutput:
        """DeFT's verdict on rows: clean when p_yes[label] > 0.5 (pos beats neg)."""
        n = len(labels)
        p_clean = np.empty(n, dtype=np.float32)
        sim_pos = np.empty(n, dtype=np.float32)
        sim_neg = np.empty(n, dtype=np.float32)
        suggested = np.empty(n, dtype=np.int64)
        confidence = np.empty(n, dtype=np.float32)
        is_clean = np.empty(n, dtype=bool)
        for start in range(0, n, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, n)
            rows = np.arange(stop - start)
            y = np.asarray(labels[start:stop], dtype=np.int64)
            images = unit_rows(embeddings[start:stop])
            pos, neg = images @ self.positive.T, images @ self.negative.T
            yes = 1.0 / (1.0 + np.exp(-self.scale * (pos - neg)))
            p_clean[start:stop] = yes[rows, y]
            clean = yes[rows, y] > 0.5
            if self.require_argmax:
                clean &= yes.argmax(axis=1) == y
            is_clean[start:stop] = clean
            sim_pos[start:stop], sim_neg[start:stop] = pos[rows, y], neg[rows, y]
            probs = softmax_rows(self.scale * pos)
            suggested[start:stop] = probs.argmax(axis=1)
            confidence[start:stop] = probs.max(axis=1)
        return DetectorOutput(
            is_clean=is_clean,
            clean_score=p_clean,
            suggested=suggested,
            confidence=confidence,
            columns={
                "deft_p_clean": p_clean,
                "deft_sim_positive": sim_pos,
                "deft_sim_negative": sim_neg,
            },
        )

    def as_dict(self) -> dict:
        return {"n_ctx": self.n_ctx, "scale": self.scale, "last_step": (self.history or [{}])[-1]}


# --------------------------------------------------------------------------------------
# The training loop (the driver only sequences it)
# --------------------------------------------------------------------------------------


class Handle:
    """Calls a trainer's methods here (`Handle(trainer)`) or on a Ray actor."""

    def __init__(self, target, remote: bool = False) -> None:
        self.target, self.remote = target, remote

    def call(self, method: str, *args):
        fn = getattr(self.target, method)
        return fn.remote(*args) if self.remote else fn(*args)

    def result(self, value):
        if self.remote:
            import ray

            return ray.get(value)
        return value


def train_prompts(blocks, trainer: Handle, cfg: DeftConfig, num_rows: int, seed: int, log=print):
    """Run cfg.steps steps over the blocks; returns the FittedDeft."""
    fraction = min(1.0, cfg.batch_size / max(num_rows, 1))
    every = max(1, cfg.steps // 10)
    for step in range(cfg.steps):
        warmup = step < cfg.warmup_steps
        state = trainer.call("text_state")
        partials = blocks.map_refs(
            deft_partial, state, step, warmup, fraction, cfg.require_argmax, seed
        )
        record = trainer.result(trainer.call("step", *partials))
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            log(
                f"[deft] step {step + 1}/{cfg.steps}: loss {record['loss']:.4f}, "
                f"taken as clean {record['selected_fraction']:.3f}"
            )
    return trainer.result(trainer.call("fitted"))
