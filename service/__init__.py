"""Everything about serving, in folders by role.

- ``web/``: the HTTP layer (app, routes, middleware, the error-status table, the playground).
- ``runtime/``: what serving needs below HTTP: engine loading, the step loop, scoring, errors.
- ``hosts/``: the processes that run the app: uvicorn, Azure ML online, Ray Serve.
- ``batch/`` and ``storage/``: batch jobs over blob storage (never import the web stack).
- ``cli/``: the ``sd-endpoint`` command line.
- ``settings.py`` and ``logs.py``: read once at start-up, shared by all of the above.

Imports go hosts -> web -> runtime, and batch -> runtime; never the other way.
"""
