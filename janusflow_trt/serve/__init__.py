"""`janusflow serve`: an OpenAI-compatible HTTP server over one Pipeline (docs/serving.md).

protocol.py  the OpenAI request / response schemas (pydantic) and the error object
media.py     data: URLs -> images (PNG / JPEG / WebP; nothing is ever fetched)
engine.py    the engine thread: owns the Pipeline, takes jobs from a bounded queue
metrics.py   Prometheus metrics
app.py       the FastAPI app: routes, auth, body limit, SSE
commands.py  the `janusflow serve` subcommand (registered by the CLI)
"""
