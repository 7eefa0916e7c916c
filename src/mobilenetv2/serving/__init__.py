"""Serving a model over HTTP: the app (`app.py`: Open Inference Protocol v2, image classification, metrics, the web
page) and the dynamic batcher it runs every request through (`batcher.py`). `mobilenetv2 serve` starts it."""
