"""The serving runtime: engine loading, the step loop, OOM handling, scoring, conversion, PNGs.

Imports neither FastAPI, Starlette nor uvicorn: batch jobs, Ray actors and the Azure ML entry
scripts use these modules without the web stack. Nothing is imported here, so importing one
module does not import the others (nor torch).
"""
