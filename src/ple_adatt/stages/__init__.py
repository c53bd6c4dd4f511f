"""Pipeline stages: paths in, paths out, a CLI each. No Kubeflow types in this package."""
