"""One module per command: validate the request on the driver, call the Ray layer (``pipeline.ray``),
summarize. ``run.py`` holds what the image-mapping commands (extract, classify, probe) share.

A new command is a module here, a typer function in ``cli.py`` and, for a Ray job, a line in ``jobs/``.
"""
