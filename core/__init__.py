"""conveyor's core: settings, database sessions, models, states and the state manager.

Nothing here imports Celery or FastAPI (see STYLE: core <- worker <- api, cli).
"""
