"""The web explorer of a run (``dml-ray serve``): a FastAPI app over :class:`~dml_ray.serve.explorer.Explorer`."""
from dml_ray.serve.explorer import Explorer

__all__ = ["Explorer"]
