"""The benchmark's handler: answers every request with one reply.

Runs on: a worker thread of the daemon that ``bench/throughput.py`` starts
(which puts this directory on the daemon's ``PYTHONPATH``). Queue and
routing keys come from the environment, so that every run uses names of its
own, also on a fixed ``AMQP_VIRTUALHOST``.
"""
import os

import gocept.amqprun.handler
import gocept.amqprun.message


QUEUE = os.environ.get('AMQPRUN_BENCH_QUEUE', 'bench.requests')
ROUTING_KEY = os.environ.get('AMQPRUN_BENCH_ROUTING_KEY', 'bench.request')
REPLY_ROUTING_KEY = os.environ.get(
    'AMQPRUN_BENCH_REPLY_ROUTING_KEY', 'bench.reply')


@gocept.amqprun.handler.declare(QUEUE, ROUTING_KEY)
def reply(message):
    """Return one reply with the request's body (persistent by default)."""
    return [gocept.amqprun.message.Message(
        header=dict(content_type='application/octet-stream'),
        body=message.body, routing_key=REPLY_ROUTING_KEY)]
