"""How scoring requests are batched by default -- by the evaluate stage and by the in-loop
evaluation alike. A request's log-likelihood depends, in its last bits, on the padded width of
the batch it lands in (the kernels' reduction order follows the shapes), so one checkpoint
scored with the same batching and the same requests gives the same numbers wherever it is
scored. No torch here: the stage's config reads these when a pipeline file is validated."""

DEFAULT_BATCH_TOKENS = 8192  # padded batch size x length per forward pass
DEFAULT_MAX_BATCH_SIZE = 256
