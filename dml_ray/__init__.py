"""dml_ray: deep metric learning on image collections at any scale."""
__version__ = "0.1.0"
