# The taskq image: the package and its console scripts (`taskq`, `taskq-rmq-init`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# The build context is the repository less what .dockerignore leaves out.
COPY . /tmp/taskq
RUN pip install --no-cache-dir /tmp/taskq \
    && rm -rf /tmp/taskq \
    && useradd --create-home --uid 10001 --user-group taskq

USER taskq
WORKDIR /home/taskq

CMD ["taskq", "--help"]
