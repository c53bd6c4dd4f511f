"""The KFP pipeline of ple-adatt: wiring and resources, compile, submit, local run, stage rerun.

    python -m pipelines.compile   # make compile: the pipeline IR YAML for Kubeflow
    python -m pipelines.submit    # make submit: upload a pipeline version and start a run
    python -m pipelines.local     # make run: the compiled pipeline through kfp.local
    python -m pipelines.stage     # make stage: rerun one stage against an earlier local run
"""
