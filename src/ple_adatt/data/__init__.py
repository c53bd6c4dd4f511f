"""Datasets: the Parquet contract, preprocessing, tensors and the synthetic generator."""
