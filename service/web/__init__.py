"""The HTTP layer: the FastAPI app, its routes, middleware, the error-status table and the playground.

A ``POST /score`` goes: middleware.py (ids, keys, body size) -> routes.py -> the runtime's Scorer
(service/runtime/scoring.py). Nothing below this package imports it.
"""
