"""DeML's object-attention proposals as activation maps (deml-zero-shot-retrieval Sec. 3.1, Fig. 4a).

Each image's scale-1 proposal (random walk over inception4e and inception5b, averaged over the
channel-attention branches) is one ``activation_maps`` row: method ``oam``, reference kind
``self``, reference id = the image id, the map at the inception4e grid in the model-input frame,
and no score (a proposal compares the image with nothing). The ``localize`` stage then boxes it
like any other map.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa
import torch

from dml_ray.io.schemas import ACTIVATION_MAPS_SCHEMA
from dml_ray.models.checkpoint import load_checkpoint
from dml_ray.models.deml import DeMLModel
from dml_ray.models.inference import select_device
from dml_ray.precision import autocast

METHOD = "oam"
REFERENCE_KIND = "self"


def object_attention_rows(maps: torch.Tensor, image_ids: list[str], run_id: str) -> pa.Table:
    """``activation_maps`` rows of B x h x w proposals, one per image."""
    n, h, w = maps.shape
    return pa.table({
        "run_id": pa.array([run_id] * n, pa.string()),
        "image_id": pa.array(image_ids, pa.string()),
        "reference_id": pa.array(image_ids, pa.string()),
        "reference_kind": pa.array([REFERENCE_KIND] * n, pa.string()),
        "method": pa.array([METHOD] * n, pa.string()),
        "map_h": pa.array(np.full(n, h, np.int32)),
        "map_w": pa.array(np.full(n, w, np.int32)),
        "map": pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32) * h * w),
                                        pa.array(maps.float().cpu().numpy().reshape(-1), pa.float32())),
        "score": pa.nulls(n, pa.float32()),
    }, schema=ACTIVATION_MAPS_SCHEMA)


def explain_deml_pair(model: DeMLModel, query: torch.Tensor, reference: torch.Tensor) -> dict[str, np.ndarray]:
    """Arrays for a pair of transformed images (3 x S x S each) through a DeML model (Sec. 3.1-3.2, Fig. 4).

    ``oam_query`` / ``oam_reference``: scale 1's object-attention proposal (h x w, the inception4e grid);
    ``cam<j>_query`` / ``cam<j>_reference`` (j = 1..J): the proposal of channel-attention branch j alone
    (their mean is the OAM map); ``cam_weights_query`` / ``cam_weights_reference``: each CAM's channel
    weights (J x C); ``learner_cosine``: the cosine between query and reference of each of the I J
    learners (scale-major); ``cosine``: the holistic embeddings' cosine (Eq. 1).
    """
    model = model.eval()
    pair = torch.stack([query, reference])
    with torch.no_grad():
        out = model(pair)
        branches, weights = model.branch_attention(pair)
    learners = torch.nn.functional.normalize(out.learners, dim=2)
    arrays: dict[str, np.ndarray] = {
        "cosine": np.float32(torch.dot(out.embedding[0], out.embedding[1])),
        "learner_cosine": (learners[0] * learners[1]).sum(1).numpy(),
    }
    for side, b in (("query", 0), ("reference", 1)):
        arrays[f"oam_{side}"] = branches[b].mean(0).numpy()
        arrays[f"cam_weights_{side}"] = weights[b].numpy()
        for j in range(model.branches):
            arrays[f"cam{j + 1}_{side}"] = branches[b, j].numpy()
    return arrays


class ObjectAttentionMapper:
    """Ray Data actor: decoded image batches -> ``oam`` activation-map rows (rows with an error are dropped)."""

    def __init__(self, checkpoint_uri: str, run_id: str, num_threads: int = 1, use_gpu: bool = False,
                 storage_options: Optional[dict] = None, precision: str = "fp32") -> None:
        torch.set_num_threads(num_threads)
        self.device = select_device(use_gpu)
        self.precision = precision
        model = load_checkpoint(checkpoint_uri, storage_options).model
        if not isinstance(model, DeMLModel):
            raise ValueError(f"{checkpoint_uri}: object-attention maps need a model.kind deml checkpoint")
        self.model = model.to(self.device).eval()
        self.run_id = run_id

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        ok = np.array([not isinstance(e, str) for e in batch["error"]], dtype=bool)
        if not ok.any():
            return ACTIVATION_MAPS_SCHEMA.empty_table()
        with torch.inference_mode(), autocast(self.precision, self.device):
            maps = self.model.object_attention(torch.from_numpy(batch["image"][ok]).to(self.device)).float()
        return object_attention_rows(maps, [str(i) for i in batch["image_id"][ok]], self.run_id)
