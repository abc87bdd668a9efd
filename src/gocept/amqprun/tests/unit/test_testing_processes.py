"""Tests for the harness's child process helpers
(gocept.amqprun.testing.processes)."""
import gocept.amqprun.testing.processes
from gocept.amqprun.testing.processes import free_ports


class FakeSocket:
    """Stands in for a socket: bind() gets the next of `ports`."""

    ports = []

    def bind(self, address):
        self.port = self.ports.pop(0)

    def getsockname(self):
        return ('127.0.0.1', self.port)

    def close(self):
        pass


def test_free_ports_never_hands_out_a_port_twice(monkeypatch):
    monkeypatch.setattr(gocept.amqprun.testing.processes,
                        '_ports_handed_out', {7001})
    monkeypatch.setattr(gocept.amqprun.testing.processes.socket, 'socket',
                        lambda *args: FakeSocket())
    FakeSocket.ports = [7001, 7002, 7003]
    assert free_ports(2) == [7002, 7003]
    assert gocept.amqprun.testing.processes._ports_handed_out == {
        7001, 7002, 7003}
