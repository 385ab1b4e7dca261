# conveyor's image: one image for every process (worker, beat, the API, Flower), and the
# base your own image builds your workflows into.
#
#   docker build -t conveyor:latest .
#
# Your workflows, in a Dockerfile of your own project:
#
#   FROM conveyor:latest
#   COPY myapp /app/myapp
#   # Their own dependencies, if any (the venv is on PATH):
#   # COPY requirements.txt /app/ && RUN pip install --no-cache-dir -r /app/requirements.txt
#   ENV CONVEYOR_WORKFLOW_MODULES=myapp.workflows
#
# /app is the working directory and on PYTHONPATH: a package copied there imports.
# Without a workflow module of your own the image runs conveyor's examples
# (CONVEYOR_WORKFLOW_MODULES=conveyor.examples.workflows; `--build-arg WORKFLOW_MODULES=...` sets
# another default, and the variable itself still wins at run time). The processes (docker-compose.yml runs each one):
#   conveyor migrate                                   once per release, before the rest
#   celery -A worker.app worker --loglevel=INFO        the workers (scale these)
#   celery -A worker.app beat --loglevel=INFO          exactly one
#   uvicorn conveyor.api.app:app --host 0.0.0.0 --port 8000     the HTTP API and the /ui dashboard
#   celery -A worker.app flower --port=5555            needs FLOWER_BASIC_AUTH
# Each runs as PID 1 (exec form): `docker stop` sends SIGTERM to Celery itself, whose warm
# shutdown lets running steps finish (give workers a stop grace longer than your steps).

# --- build: conveyor as a wheel, installed with its api and flower extras into a venv ----
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/conveyor
WORKDIR /src
COPY pyproject.toml README.md ./
COPY conveyor ./conveyor
COPY core ./core
COPY worker ./worker
COPY migrations ./migrations
# A wheel (not an editable install): what runs is what pip would install from an index,
# package data (the dashboard's templates, the migrations) included.
RUN /opt/conveyor/bin/pip wheel --no-deps --wheel-dir /wheels . \
 && /opt/conveyor/bin/pip install "$(ls /wheels/conveyor-*.whl)[api,flower]"

# --- runtime: the venv, a non-root user, no compilers or sources --------------------------
FROM python:3.11-slim
ARG WORKFLOW_MODULES=conveyor.examples.workflows
ENV PATH=/opt/conveyor/bin:$PATH \
    PYTHONPATH=/app \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVEYOR_WORKFLOW_MODULES=${WORKFLOW_MODULES}
COPY --from=build /opt/conveyor /opt/conveyor
# Graphviz's dot lays out the dashboard's DAGs (without it the pages say so).
RUN apt-get update \
 && apt-get install -y --no-install-recommends graphviz \
 && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 10001 conveyor \
 && mkdir -p /app /var/lib/conveyor \
 && chown conveyor /var/lib/conveyor
WORKDIR /app
USER conveyor
EXPOSE 8000 5555
CMD ["celery", "-A", "worker.app", "worker", "--loglevel=INFO"]
