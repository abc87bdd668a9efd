"""``connection`` against the real broker: what py-amqp internals it hooks
still behave as it expects (see setup.py's version range)."""
import amqp.exceptions
import pytest

import gocept.amqprun.connection


@pytest.fixture
def connection(amqp_broker, amqp_vhost):
    connection = gocept.amqprun.connection.connect(
        amqp_broker.parameters(amqp_vhost))
    yield connection
    connection.collect()


def wait_on(channel, attempts=100):
    """Round trips on ``channel`` until one of them raises."""
    for _ in range(attempts):
        channel.basic_qos(0, 1, False)
    pytest.fail('no error within %d round trips' % attempts)


def test_a_broker_close_names_its_channel_in_a_wait_on_another(connection):
    closing, waiting = connection.channel(), connection.channel()
    closing.exchange_declare('no-such-exchange', 'topic', passive=True,
                             nowait=True)
    with pytest.raises(amqp.exceptions.NotFound) as caught:
        wait_on(waiting)  # one of its waits reads the other's close
    assert caught.value.channel is closing
    assert closing.closed_by_broker is caught.value
    assert waiting.closed_by_broker is None
    assert not gocept.amqprun.connection.is_close_of(
        caught.value, waiting)
    waiting.basic_qos(0, 1, False)  # the connection lives on


def test_the_scratch_channel_is_replaced_after_the_broker_closed_it(
        connection):
    scratch = gocept.amqprun.connection.ScratchChannel(connection)
    first = scratch.channel()
    with pytest.raises(amqp.exceptions.NotFound):
        first.exchange_declare('no-such-exchange', 'topic', passive=True)
    second = scratch.channel()
    assert second is not first
    second.tx_commit()  # in transaction mode
