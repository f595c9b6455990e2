"""Per-GPU policy as pure code over plain data (installed as lithos_ray.scheduler; no Ray import)."""
