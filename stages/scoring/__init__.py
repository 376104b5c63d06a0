"""Scoring a language model, shared by the ``evaluate`` stage and the training loop (not a stage):

* :mod:`stages.scoring.lm` -- loading a checkpoint as something that scores text, and the batched passes;
* :mod:`stages.scoring.batching` -- the default batching, shared so that every path scores alike;
* :mod:`stages.scoring.tasks` -- multiple-choice tasks as scoring requests;
* :mod:`stages.scoring.metrics` -- the arithmetic (accuracy, standard errors, bits per byte);
* :mod:`stages.scoring.perplexity` -- bits per byte over held-out text and the validation split;
* :mod:`stages.scoring.hook` -- the same code as a validator inside the training loop;
* :mod:`stages.scoring.entries` -- tasks and text sets as a pipeline file names them;
* :mod:`stages.scoring.jobs` -- evaluation jobs (one checkpoint x one task group), their
  fingerprints and their results stored beside the checkpoint;
* :mod:`stages.scoring.checkpoint_eval` -- the jobs run on each checkpoint as training commits it.

``train`` and ``evaluate`` import this package and it imports neither, so an edit to one stage
never changes the other's code digest. Nothing is imported with the package (the registry imports
every package under ``stages/`` at startup, and these modules import torch).
"""
