"""Orders counted per customer in ZODB; the new total goes into the reply.

Runs on: the daemon's worker threads (the handler) and its main thread
(the subscribers).

The recipe of the Databases chapter, complete:

* the ``DB`` is opened once, on ``IConfigFinished`` (before any handler
  runs), from the ``<settings>`` key ``orders.zodb``, and closed on
  ``IWorkersStopped`` (after the last handler has finished);
* each worker thread has one connection, opened on first use and bound to
  that thread's transaction manager (``db.open()`` uses the thread-local
  ``transaction.manager``), so the handler's writes commit or abort with
  the message's transaction;
* the handler is idempotent by message id: a message handled before (its
  AMQP commit was in doubt and the broker redelivered it) writes nothing
  and replies with the total stored then.

A message's body is the customer's name; the reply (routing key
``orders.total``) carries the customer's new total of orders.
"""
import threading

import BTrees.OOBTree
import persistent
import ZODB
import ZODB.FileStorage
import zope.component

import gocept.amqprun.handler
import gocept.amqprun.interfaces
import gocept.amqprun.message


db = None
_local = threading.local()


@zope.component.adapter(gocept.amqprun.interfaces.IConfigFinished)
def open_database(event):
    """Open the FileStorage named by the ``orders.zodb`` setting."""
    global db
    settings = zope.component.getUtility(
        gocept.amqprun.interfaces.ISettings)
    db = ZODB.DB(ZODB.FileStorage.FileStorage(settings['orders.zodb']))


@zope.component.adapter(gocept.amqprun.interfaces.IWorkersStopped)
def close_database(event):
    """No handler runs any more: close the database."""
    global db
    if db is not None:
        db.close()
        db = None


def root():
    """The root of this worker thread's connection."""
    connection = getattr(_local, 'connection', None)
    if connection is None or connection.db() is not db:
        connection = _local.connection = db.open()
    return connection.root()


class Customer(persistent.Persistent):
    """A customer's orders: the total and the message id of each order."""

    def __init__(self):
        self.total = 0
        self.orders = BTrees.OOBTree.OOBTree()  # message id -> total then

    def order(self, message_id):
        """Count the order once; return the total after it."""
        if message_id not in self.orders:
            self.total += 1
            self.orders[message_id] = self.total
        return self.orders[message_id]


def customers():
    """The customers' BTree, created on first use."""
    data = root()
    if 'customers' not in data:
        data['customers'] = BTrees.OOBTree.OOBTree()
    return data['customers']


@gocept.amqprun.handler.declare('orders.count', 'orders.placed')
def count_order(message):
    """Count the order of the customer named in the body; reply the total.
    """
    name = message.body.decode('utf-8')
    all_customers = customers()
    customer = all_customers.get(name)
    if customer is None:
        customer = all_customers[name] = Customer()
    total = customer.order(message.header.message_id)
    return [gocept.amqprun.message.Message(
        {'content_type': 'text/plain', 'customer': name},
        str(total), routing_key='orders.total')]
