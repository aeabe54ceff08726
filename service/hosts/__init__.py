"""Processes that host the app: uvicorn with draining (`sd-endpoint serve`), the Azure ML online
entry script, and Ray Serve. Each builds the app from service/web and runs it its own way."""
