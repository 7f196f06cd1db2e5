"""dml_ray: deep metric learning on image collections at any scale."""
__version__ = "0.1.0"

from dml_ray.io.run import Run, list_runs, open_run  # noqa: E402

__all__ = ["Run", "list_runs", "open_run", "__version__"]
