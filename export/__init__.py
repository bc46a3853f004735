"""Checkpoint -> ONNX bundle: graphs (graphs.py), build -> export -> validate -> save (pipeline.py),
checks against PyTorch (validate.py) and the `nmt export` command (cli.py)."""
