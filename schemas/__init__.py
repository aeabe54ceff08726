"""Wire types (pydantic) of the scoring API and batch records. Imports nothing from the project."""
