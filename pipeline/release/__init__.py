"""``lmpipe release``: a pipeline's committed records gathered (:mod:`.records`), rendered into
cards (:mod:`.cards`) and written with a digest of every file (:mod:`.bundle`)."""
