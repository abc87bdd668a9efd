"""Tests for gocept.amqprun."""
