# session_svc API image. The same image runs the other entry points:
#   docker run IMAGE session-svc migrate             (apply DB migrations; run before the API)
#   docker run --restart unless-stopped IMAGE session-svc worker
#                                                    (write-through worker; run alongside. It survives
#                                                    Redis/Postgres outages by itself; the restart
#                                                    policy covers a crash or the OOM killer)
# Configure with the variables in config/session_svc.env.example (e.g. --env-file).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install from a throwaway copy so the code that runs is the installed package (with its package
# data: Lua scripts, migrations), never a source tree in the working directory. All pinned
# dependencies ship manylinux wheels for 3.11, so no compiler is needed.
COPY pyproject.toml README.md /tmp/src/
COPY session_svc /tmp/src/session_svc
COPY workers /tmp/src/workers
RUN pip install /tmp/src && rm -rf /tmp/src

RUN useradd --system --user-group --uid 10001 --create-home --shell /usr/sbin/nologin app
USER app
WORKDIR /home/app

ENV SERVICE_HOST=0.0.0.0 \
    SERVICE_PORT=8205
EXPOSE 8205
# Liveness for the container runtime; the same command is tested (tests/test_cli.py).
HEALTHCHECK --interval=10s --timeout=5s --retries=3 CMD ["session-svc", "health"]
CMD ["session-svc", "api"]
