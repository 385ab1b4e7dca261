"""conveyor's HTTP API and dashboard: ``uvicorn conveyor.api.app:app`` (install
``conveyor[api]``)."""
