"""Datasets: split manifests, the dataset registry, image loading, samplers."""
