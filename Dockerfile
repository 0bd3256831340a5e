# One image for every vmqueue process: workers (one service per provider queue), Flower, the CLI.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY vmqueue ./vmqueue
COPY producer ./producer
COPY workers ./workers
COPY flower.conf ./
RUN pip install --no-cache-dir ".[all]" \
 && useradd --create-home --uid 10001 vmq
USER vmq

# Override per service, e.g. `vmq worker --provider aws`.
CMD ["vmq", "--help"]
