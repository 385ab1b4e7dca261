"""Celery side of conveyor: app, tasks, step engine, reconciler (builds on core)."""
