"""fastText classifiers in the pipeline: ``train_classifier`` trains one from labelled rows (a
source or a file of reference texts against sampled crawl documents), ``classify`` scores
documents with it or with a pinned user model and keeps or drops them by a threshold."""

# Importing the stages registers them: the registry imports every ``stages.<package>``.
from stages.classifier.classify import Classify
from stages.classifier.train import TrainClassifier

__all__ = ["Classify", "TrainClassifier"]
