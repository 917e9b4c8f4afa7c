"""The JSON Schemas of Ozwell's requests and responses, shipped as package data (`ozwell_schemas`)."""
