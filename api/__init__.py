"""conveyor's HTTP API and dashboard: ``uvicorn api.app:app`` (install ``conveyor[api]``)."""
