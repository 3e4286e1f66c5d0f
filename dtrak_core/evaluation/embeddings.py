"""Image embeddings from a local model folder, for the counterfactual check's embedding cosine.

The paper compares the image before and after a removal by the cosine of their CLIP
embeddings. Nothing is downloaded here: the user points ``--embedding-model`` at a folder
written by ``transformers`` ``save_pretrained`` (a CLIP model, or any vision model such as
DINOv2) that holds its ``preprocessor_config.json``.

Embedding of an image x: e(x) = f(preprocess(x)) / ||f(preprocess(x))||, where f is the
model's projected image features (``get_image_features``) when it has them, else its pooled
output, else the mean of its last hidden states. Cosine(before, after) = e(before) . e(after).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtrak_core.io import sha256_file


class EmbeddingModelError(ValueError):
    """The embedding-model folder cannot be used (missing files, unknown architecture)."""


@dataclass
class ImageEmbedder:
    """A loaded local embedding model. ``name`` identifies it in records: folder name + weights hash."""

    model: torch.nn.Module
    processor: object
    name: str

    @torch.no_grad()
    def embed(self, images: np.ndarray) -> np.ndarray:
        """images: (N, H, W, 3) uint8 -> (N, D) float64 unit vectors."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
        else:
            out = self.model(pixel_values=pixels)
        if not torch.is_tensor(out):
            # transformers 5 returns a ModelOutput; its pooled output is the (projected) embedding.
            pooled = getattr(out, "pooler_output", None)
            out = pooled if pooled is not None else out.last_hidden_state.mean(dim=1)
        features = out.reshape(len(images), -1).double()
        return (features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)).numpy()

    def cosine(self, before: np.ndarray, after: np.ndarray) -> float:
        """Cosine of the embeddings of two uint8 (H, W, 3) images (1 = same, lower = bigger change)."""
        a, b = self.embed(np.stack([before, after]))
        return float(a @ b)


def load_embedder(folder: str | Path) -> ImageEmbedder:
    """Load a ``transformers`` image model and its processor from a local folder (never downloads)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise EmbeddingModelError(f"embedding model folder {folder} has no config.json; expected a folder "
                                  "written by transformers save_pretrained (e.g. a CLIP model)")
    if not (folder / "preprocessor_config.json").is_file():
        raise EmbeddingModelError(f"embedding model folder {folder} has no preprocessor_config.json; save the "
                                  "model's image processor into it (processor.save_pretrained(folder))")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise EmbeddingModelError(f"embedding model folder {folder} has no .safetensors weights")
    # transformers is slow to import and needed only when an embedding model is asked for.
    from transformers import AutoImageProcessor, AutoModel

    try:
        model = AutoModel.from_pretrained(folder, local_files_only=True, use_safetensors=True).eval()
        processor = AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise EmbeddingModelError(f"cannot load the embedding model in {folder}: {error}") from error
    return ImageEmbedder(model, processor, f"{folder.name}@{sha256_file(weights[0])[:12]}")
