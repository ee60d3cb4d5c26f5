"""sampa-ray: SAMPa (Sharpness-Aware Minimization Parallelized) training on Ray."""

__version__ = "0.1.0"
