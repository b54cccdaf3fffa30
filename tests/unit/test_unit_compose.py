"""docker-compose.yml: exact image tags (the tests' containers use the same), and host ports
that leave the machine's own RabbitMQ and PostgreSQL (README's path without Docker) alone."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import compose_image

COMPOSE = (Path(__file__).parent.parent.parent / "docker-compose.yml").read_text()
# The standard ports of a RabbitMQ and a PostgreSQL running on the machine itself.
LOCAL_SERVICE_PORTS = {5672, 15672, 5432}


@pytest.mark.parametrize(
    ("name", "pinned"),
    [
        ("rabbitmq", r"rabbitmq:4\.\d+\.\d+-management"),
        ("postgres", r"postgres:16\.\d+"),
    ],
)
def test_images_are_pinned_to_an_exact_release(name: str, pinned: str) -> None:
    assert re.fullmatch(pinned, compose_image(name))


def published_ports() -> list[tuple[str, int, int]]:
    """(override variable, default host port, container port) of every published port."""
    found = re.findall(r'- "127\.0\.0\.1:\$\{(\w+):-(\d+)\}:(\d+)"', COMPOSE)
    return [(variable, int(host), int(container)) for variable, host, container in found]


def test_broker_and_database_ports_do_not_clash_with_local_services() -> None:
    ports = published_ports()
    assert {container for _, _, container in ports} == {5672, 15672, 5432}
    for variable, host, _ in ports:
        assert host not in LOCAL_SERVICE_PORTS, f"{variable} defaults to {host}"
        assert variable.endswith("_HOST_PORT")  # overridable
