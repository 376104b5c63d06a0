"""The model that ``train`` trains and ``evaluate`` scores, shared by both (not a stage):

* :mod:`stages.model.transformer` -- the LLaMA-style transformer and its named shapes;
* :mod:`stages.model.hf` -- conversion to and from the Hugging Face layout, both directions;
* :mod:`stages.model.checkpoint` -- the train stage's checkpoint format, and reading a model from it.

Train and evaluate import this package, and it imports neither, so evaluation never depends on
training code. Nothing here is imported with the package: the registry imports every package
under ``stages/`` at startup, and these modules import torch.
"""
