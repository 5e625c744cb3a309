"""`lorafit serve`: one base model, many adapters, an OpenAI-compatible HTTP API and a playground.

models.py holds the base and the adapters by name; batcher.py batches every waiting request into
one decode loop; protocol.py checks requests and shapes answers as OpenAI does; app.py is the
FastAPI app and the command. Needs the `serve` extra (FastAPI, uvicorn), imported only here.
"""
