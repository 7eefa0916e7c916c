"""Inference engines: which one runs a model (`choose`), the ONNX files and engine sessions (`onnx_files`), and
timing on this CPU (`timing`)."""
