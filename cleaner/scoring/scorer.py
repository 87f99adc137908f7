"""The CLIP scoring stage: uint8 images in, zero-shot scores and embeddings out.

`ClipScorer` is a Ray Data actor class (it loads its model once in __init__ and maps
dict[str, ndarray] -> dict[str, ndarray] in __call__), but it is plain Python and runs
in-process too, which is how the unit tests and the benchmark's model-only stage use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings

import numpy as np
import torch

from cleaner.checks.perturb import EDITS, edit_pixels
from cleaner.config import ModelConfig
from cleaner.reading.shards import STATUS_OK
from cleaner.scoring.columns import PASSTHROUGH_COLUMNS, SCORE_OUTPUT_COLUMNS
from cleaner.scoring.models import LoadedClip, load_clip
from cleaner.scoring.prompts import PromptBank, ensemble_log_probs
from cleaner.selection.probe_streaming import stable_hash

TWIN_EVERY = 64
"""One image in this many (chosen by key hash) is also embedded as an edited copy; the
cosine to its copy (`twin_cosine`) calibrates the near-duplicate threshold (docs/checks.md)."""


def content_hashes(images: np.ndarray, usable: np.ndarray) -> np.ndarray:
    """Per row: a 128-bit hash (hex) of its decoded pixels at the model's input size, or
    None where the row is not usable. Identical bytes decode to identical pixels."""
    out = np.full(len(images), None, dtype=object)
    for row in np.nonzero(usable)[0]:
        pixels = np.ascontiguousarray(images[row])
        digest = hashlib.blake2b(pixels.tobytes(), digest_size=16)
        digest.update(str(pixels.shape).encode())
        out[row] = digest.hexdigest()
    return out


def edited_copies(
    images: np.ndarray, keys: np.ndarray, usable: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(edited copies, their rows) of the usable rows whose key hash picks them for the
    calibration; the hash also picks the edit and seeds it (the same whatever the batch)."""
    hashed = stable_hash(np.asarray(keys, dtype=object).astype(str), seed=TWIN_EVERY)
    rows = np.nonzero(usable & (hashed % np.uint64(TWIN_EVERY) == 0))[0]
    seeds = hashed[rows] // np.uint64(TWIN_EVERY)
    copies = [
        edit_pixels(images[r], EDITS[int(h) % len(EDITS)], np.random.default_rng(int(h)))
        for r, h in zip(rows, seeds, strict=True)
    ]
    return (np.stack(copies) if copies else images[:0]), rows


class ClipScorer:
    """Scores batches with a frozen CLIP and a prompt-ensemble text matrix."""

    input_columns = ("image", "label", "status", *PASSTHROUGH_COLUMNS)
    output_columns = SCORE_OUTPUT_COLUMNS

    def __init__(
        self,
        model_config: dict,
        prompt_bank: PromptBank | list,
        tau: float = 0.07,
        top_k: int = 5,
        device: str | None = None,
        num_threads: int | None = None,
    ):
        if isinstance(
            prompt_bank, list
        ):  # [ObjectRef] from the driver: fetched, not copied per call
            import ray

            prompt_bank = ray.get(prompt_bank[0])
        if num_threads:
            torch.set_num_threads(num_threads)
        self.clip: LoadedClip = load_clip(ModelConfig(**model_config), device=device)
        if self.clip.amp_dtype is not None:
            # frozen weights cast once, not on every forward by autocast
            self.clip.model.to(self.clip.amp_dtype)
        self.text = torch.tensor(prompt_bank.features).to(self.clip.device)
        self.mask = torch.tensor(prompt_bank.mask).to(self.clip.device)
        # every prompt's features as one [D, K*J] matrix, padding at -inf similarity
        self.flat_text = self.text.reshape(-1, self.text.shape[-1]).T.contiguous()
        self.flat_pad = torch.where(self.mask.reshape(-1), 0.0, float("-inf"))
        self.tau, self.top_k = tau, min(top_k, prompt_bank.num_classes)
        shape = (1, 3, 1, 1)
        self.mean = torch.from_numpy(self.clip.mean).reshape(shape).to(self.clip.device)
        self.std = torch.from_numpy(self.clip.std).reshape(shape).to(self.clip.device)

    def to_device(self, images: np.ndarray) -> torch.Tensor:
        """uint8 images on the scoring device, without an extra host copy.

        On a GPU the batch goes through pinned memory with a non-blocking copy; on CPU
        the tensor shares the batch's memory (it is only read).
        """
        array = np.ascontiguousarray(images, dtype=np.uint8)
        with warnings.catch_warnings():  # Ray's batches may be read-only; we never write
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            pixels = torch.from_numpy(array)
        if self.clip.device.type == "cuda":
            return pixels.pin_memory().to(self.clip.device, non_blocking=True)
        return pixels.to(self.clip.device)

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> L2-normalised float32 image embeddings [B, D] (on device)."""
        pixels = self.to_device(images)
        pixels = pixels.permute(0, 3, 1, 2).float().div_(255.0).sub_(self.mean).div_(self.std)
        amp = (
            torch.autocast(self.clip.device.type, dtype=self.clip.amp_dtype)
            if self.clip.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            feats = self.clip.model.encode_image(pixels)
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.no_grad()
    def score(
        self, images: np.ndarray, twins: np.ndarray | None = None, rows: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """probs [B, K], top-k probs and labels, the best prompt cosine, embeddings, and the
        cosine of `rows` to their edited copies `twins` (NaN elsewhere): computed on the
        device and brought back in one transfer (one sync per batch)."""
        feats = self.embed(images)
        probs = ensemble_log_probs(feats, self.text, self.mask, self.tau).exp_()
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        k, width = probs.shape[1], self.top_k
        best = (feats @ self.flat_text + self.flat_pad).amax(dim=1, keepdim=True)
        twin = torch.full_like(best, float("nan"))
        if twins is not None and len(twins):
            index = torch.as_tensor(rows, device=feats.device)
            twin[index, 0] = (self.embed(twins) * feats[index]).sum(dim=1)
        host = torch.cat([probs, top_p, top_i.to(torch.float32), best, twin, feats], dim=1)
        host = host.cpu().numpy()
        return {
            "probs": host[:, :k],
            "topk_probs": host[:, k : k + width],
            "topk_labels": host[:, k + width : k + 2 * width].astype(np.int64),
            "max_similarity": host[:, k + 2 * width],
            "twin_cosine": host[:, k + 2 * width + 1],
            "embedding": host[:, k + 2 * width + 2 :].astype(np.float16),
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok_image = np.asarray(batch["status"]) == STATUS_OK  # decoded: a real image
        scored = self.score(batch["image"], *edited_copies(batch["image"], batch["key"], ok_image))
        probs_np = scored["probs"]
        labels = np.asarray(batch["label"], dtype=np.int64)
        ok = ok_image & (labels >= 0)
        p_label = np.full(len(labels), np.nan, dtype=np.float32)
        rows = np.nonzero(ok)[0]
        p_label[rows] = probs_np[rows, labels[rows]]
        out = {name: batch[name] for name in PASSTHROUGH_COLUMNS}
        out.update(
            p_label=p_label,
            max_p=probs_np.max(axis=1).astype(np.float32),
            argmax=probs_np.argmax(axis=1).astype(np.int64),
            topk_labels=scored["topk_labels"],
            topk_probs=scored["topk_probs"].astype(np.float32),
            embedding=scored["embedding"],
            content_hash=content_hashes(batch["image"], ok_image),
            max_similarity=scored["max_similarity"].astype(np.float32),
            twin_cosine=scored["twin_cosine"].astype(np.float32),
        )
        return out
