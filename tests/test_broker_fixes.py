"""workers/broker_fixes.py: a channel torn down by a connection loss fails as a connection error.

The system-level proof is tests/test_chaos.py R2 (every worker survives a Redis restart); this pins
the kombu behaviour the fix relies on, so a kombu upgrade that changes it is noticed here.
"""

from __future__ import annotations

import pytest
import redis
from kombu import Connection
from kombu.transport import redis as kombu_redis

from workers import broker_fixes


@pytest.fixture
def torn_down_channel(redis_url: str):
    # What celery 5.7's consumer does on a connection loss: collect() (the transport forgets its
    # client and the channel its pool), after which the channel is still used (restore, ack).
    connection = Connection(redis_url)
    channel = connection.default_channel
    connection.collect()
    return channel


def test_restore_and_ack_on_a_torn_down_channel_raise_connection_errors(torn_down_channel):
    broker_fixes.apply()
    with pytest.raises(redis.ConnectionError):
        torn_down_channel.qos.restore_unacked()
    with pytest.raises(redis.ConnectionError):
        torn_down_channel.qos.ack("some-delivery-tag")
    # A connection error is what kombu and celery tolerate while closing a broken connection.
    assert issubclass(redis.ConnectionError, kombu_redis.Transport.connection_errors)


def test_without_the_fix_kombu_raises_attribute_error(torn_down_channel, monkeypatch):
    # The upstream bug itself: when this fails, kombu fixed it and broker_fixes can go.
    monkeypatch.setattr(kombu_redis.Channel, "_connparams", broker_fixes._original)
    with pytest.raises(AttributeError, match="NoneType"):
        torn_down_channel.qos.restore_unacked()
