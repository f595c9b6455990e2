"""Cluster placement from diurnal traffic profiles (installed as lithos_ray.placement; no GPU code)."""
