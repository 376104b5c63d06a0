"""What stages hand to the stages after them (:class:`~pipeline.contracts.StageSummary` models), one
module per producing stage, in a package of their own (not a stage): a consumer imports the
summary it reads, never the package of the stage that wrote it, so neither its imports nor its
code digest reach the other stage's code. Nothing is imported with the package."""
