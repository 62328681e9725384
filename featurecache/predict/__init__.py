"""Prediction: a trained head used on new images, giving scores, labels and localisation pictures.

A head file records how its training cache was extracted (backbone and the SHA-256 of its
weights, layer, preprocessing, patch grid, mode, stored dtype). :func:`load_head` reads it
and rebuilds that extractor once, finding the weights the same way ``extract`` does and
refusing, with the setting that differs, weights whose hash is not the recorded one. The
new images then go through :func:`featurecache.extract.extract` itself (batches span
images), into a temporary cache or a kept one, and are scored by the head's own route
(:meth:`~featurecache.heads.trained.TrainedHead.image_scores`), exactly as ``eval`` scores a
cache. An image that cannot be read gets a row with its error; the others are scored.
"""

from featurecache.predict.predictor import PredictConfig, Predictor, load_head, predict
from featurecache.predict.results import Predictions

__all__ = ["PredictConfig", "Predictions", "Predictor", "load_head", "predict"]
