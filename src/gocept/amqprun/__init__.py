"""gocept.amqprun: run AMQP message handlers in a ZTK-integrated daemon.

The life of one message, module by module:

1. ``server``: the I/O thread receives a delivery, wraps it in a
   ``message.Message`` and queues a ``Task``; the broker sends at most
   ``prefetch_count`` unacked messages, so the queue stays bounded.
   (``connection`` opens the connection, ``topology`` declares the queues.)
2. ``worker``: a worker thread takes the task, begins a transaction,
   creates a ``session.Session`` and joins its ``AMQPDataManager``.
3. ``handler``: the handler runs; the messages it returns (or sends through
   ``ISender``) are recorded in the session. No worker touches a channel.
4. ``datamanager``: in ``tpc_vote`` (after every other resource voted) the
   session becomes one ``channelops.Commit`` (ack + publishes) that the
   worker submits to the server and waits for.
5. ``commits``: between reads the I/O thread executes the due ops and
   commits them in one AMQP transaction per channel; a failed transaction
   is given back with a ``channelops.Reject`` after the retry delay
   (``retry``), and the worker notifies ``IMessageHandled``.

``interfaces`` holds every contract; read it first. Wiring: ``config``
(ZConfig), ``zcml`` (directives), ``process`` (stop requests, exit status),
``main`` (the ``server`` script). Features built on the core:
``writefiles``, ``readfiles``, ``summary``, ``metrics`` (with
``status``, the ``amqprun-status`` script), ``send``, ``security``;
``testing`` helps users test their handlers.
"""
