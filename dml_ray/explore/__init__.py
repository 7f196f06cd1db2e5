"""Use a run's model and embeddings live: an image embedder from a checkpoint, a saved search index per run."""
from dml_ray.explore.index import RunIndex, run_checkpoint, run_index
from dml_ray.explore.model import ImageEmbedder, load_model

__all__ = ["ImageEmbedder", "RunIndex", "load_model", "run_checkpoint", "run_index"]
