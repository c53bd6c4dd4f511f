"""KFP components: one folder per pipeline stage, each a thin typed adapter around a stage.

    components/<stage>/component.py   the @dsl.component (stdlib + kfp at the top; the stage
                                      is imported inside the function, in the container)
    components/<stage>/metadata.yaml  name, version, stability, dependencies
    components/<stage>/README.md      inputs, outputs, how to run the stage by hand
    components/<stage>/component.yaml the compiled component, committed (`make components`)

:data:`COMPONENTS` lists them in pipeline order; the version of every component is the
package version (``ple_adatt.__version__``), and so is the tag of the image it runs in.
"""

from __future__ import annotations

#: stage name (as in `ple-adatt <stage>` and the pipeline task name) -> component folder
COMPONENTS: dict[str, str] = {
    "validate": "validate",
    "train-phase1": "train_phase1",
    "train-phase2": "train_phase2",
    "report": "report",
    "register": "register",
    "compare": "compare",  # the compare pipeline only (pipelines/compare_pipeline.py)
}
