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

# In a container the API listens on every interface, or a published port reaches
# nothing. It then answers requests made to an IP address or to localhost; other
# names (a service name, a DNS name) go into TASKQ_ALLOWED_HOSTS (see compose.yaml).
ENV TASKQ_HTTP_HOST=0.0.0.0

CMD ["taskq", "--help"]
