"""Tests for the ZODB example, written with gocept.amqprun.testing.

Run them with ``pytest examples/zodb``: the ``zodb_path`` fixture gives a
fresh FileStorage in a temporary directory, ``amqp_main`` runs the daemon
with the example's ``site.zcml`` and ``app.conf.in``.
"""
import os

import gocept.amqprun.message
import gocept.amqprun.testing

import orders


HERE = os.path.dirname(os.path.abspath(__file__))


def read(name):
    with open(os.path.join(HERE, name)) as f:
        return f.read()


def start(amqp_main, zodb_path):
    """Run the daemon with the example's own ZCML and configuration."""
    return amqp_main(read('site.zcml'), config=read('app.conf.in'),
                     zodb=zodb_path)


def totals(zodb_path):
    """{customer: total} as stored on disk."""
    db = gocept.amqprun.testing.open_zodb(zodb_path)
    try:
        with db.transaction() as connection:
            return {name: customer.total for name, customer in
                    connection.root()['customers'].items()}
    finally:
        db.close()


def test_an_order_counted_twice_by_message_id_counts_once(zodb):
    orders.db = zodb
    try:
        message = gocept.amqprun.message.Message(
            {'message_id': '<1@shop>'}, b'alice', routing_key='orders.placed')
        [reply] = orders.count_order(message)
        [again] = orders.count_order(message)  # e.g. redelivered
        assert reply.body == again.body == b'1'
        assert reply.header.headers['customer'] == 'alice'
    finally:
        orders.close_database(None)


def test_daemon_counts_orders_per_customer_and_replies_the_total(
        amqp_main, amqp_client, zodb_path):
    main = start(amqp_main, zodb_path)
    amqp_client.expect_message_on('orders.total')
    for name in ['alice', 'bob', 'alice']:
        amqp_client.send_message(name.encode(), 'orders.placed')
    replies = [amqp_client.wait_for_message() for _ in range(3)]
    assert sorted((reply.properties['application_headers']['customer'],
                   reply.body) for reply in replies) == [
        ('alice', '1'), ('alice', '2'), ('bob', '1')]
    assert main.stop() == 0  # closes the database (IWorkersStopped)
    assert orders.db is None
    assert totals(zodb_path) == {'alice': 2, 'bob': 1}
