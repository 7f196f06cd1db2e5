"""dml_ray: deep metric learning on image collections at any scale."""
__version__ = "0.1.0"

from dml_ray.io.run import Run, list_runs, open_run  # noqa: E402


def load_model(uri: str, storage=None, use_gpu: bool = False):  # noqa: ANN201 - an ImageEmbedder, imported lazily
    """An embedder (``embed(images)``) from a checkpoint at any fsspec URI (dml_ray/explore/model.py)."""
    from dml_ray.explore.model import load_model as _load

    return _load(uri, storage, use_gpu)


__all__ = ["Run", "list_runs", "load_model", "open_run", "__version__"]
