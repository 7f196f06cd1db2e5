"""Checkpoints: weights, model config, image size, class list and versions; loaded with weights_only."""
from __future__ import annotations

import hashlib
import io
import pickle
import platform
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import torch

import dml_ray
from dml_ray.config import ModelConfig
from dml_ray.errors import BadInput, CheckpointRefused
from dml_ray.io.fs import is_local, url_to_fs
from dml_ray.models.embedding import build_model


@dataclass(frozen=True)
class LoadedModel:
    """A model restored from a checkpoint, with what it was trained on."""

    model: torch.nn.Module  # an EmbeddingModel, or a DeMLModel for model.kind deml
    model_config: ModelConfig
    image_size: int
    class_names: list[str]
    model_id: str
    extra: dict[str, Any]
    objective_state: dict[str, torch.Tensor]


def versions() -> dict[str, str]:
    """Versions of the software a checkpoint or manifest was written with."""
    import ray
    import torchvision

    return {
        "dml_ray": dml_ray.__version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "ray": str(ray.__version__),
        "python": platform.python_version(),
    }


def checkpoint_bytes(
    model: torch.nn.Module,
    model_config: ModelConfig,
    image_size: int,
    class_names: list[str],
    extra: Optional[dict[str, Any]] = None,
    objective: Optional[torch.nn.Module] = None,
) -> bytes:
    """Serialise a model, its training objective's parameters (e.g. the MPN) and metadata (weights_only-safe)."""
    payload = {
        "format": 1,
        "state_dict": _cpu_state(model),
        "objective_state": _cpu_state(objective) if objective is not None else {},
        "model_config": model_config.model_dump(mode="json"),
        "image_size": int(image_size),
        "class_names": list(class_names),
        "versions": versions(),
        "extra": dict(extra or {}),
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    return buf.getvalue()


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(uri: str, data: bytes, storage_options: Optional[dict] = None) -> None:
    """Write serialised checkpoint bytes to an fsspec URI, atomically (temporary file + rename; one PUT on S3)."""
    fs, path = url_to_fs(uri, storage_options)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}" if is_local(fs) else path
    with fs.open(tmp, "wb") as f:
        f.write(data)
    if tmp != path:
        fs.mv(tmp, path)


def model_id_of(data: bytes, backbone: str) -> str:
    """A model id that changes whenever the weights do: backbone plus a content hash."""
    return f"{backbone}-{hashlib.sha256(data).hexdigest()[:12]}"


def _load_payload(uri: str, data: bytes, map_location: str) -> Any:
    """``torch.load(weights_only=True)`` of a checkpoint's bytes; a refused or unreadable file is BadInput (exit 2:
    no retry fixes it) naming ``uri``."""
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line]
        reason = f" ({found[0].split('. ')[0][:160]})" if found else ""
        raise CheckpointRefused(f"{uri}: refused: the checkpoint carries code or objects that weights-only loading "
                                f"does not allow{reason}") from None
    except (RuntimeError, EOFError, ValueError, KeyError, IndexError) as err:
        reason = str(err).split(". ")[0][:160] or type(err).__name__
        raise BadInput(f"{uri}: not a readable checkpoint ({len(data)} bytes; truncated or damaged? {reason})") \
            from None


def load_checkpoint(uri: str, storage_options: Optional[dict] = None, map_location: str = "cpu") -> LoadedModel:
    """Load a checkpoint written by ``checkpoint_bytes`` (torch.load with weights_only=True)."""
    fs, path = url_to_fs(uri, storage_options)
    with fs.open(path, "rb") as f:
        data = f.read()
    payload = _load_payload(uri, data, map_location)
    if not isinstance(payload, dict) or payload.get("format") != 1:
        raise ValueError(f"{uri}: not a dml_ray checkpoint")
    cfg = ModelConfig.model_validate({**payload["model_config"], "weights": "none"})
    model = build_model(cfg, payload["image_size"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return LoadedModel(model, cfg, payload["image_size"], payload["class_names"], model_id_of(data, cfg.backbone),
                       payload["extra"], payload.get("objective_state", {}))
