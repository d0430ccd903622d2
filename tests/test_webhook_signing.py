"""Webhook signatures: what a receiver computes by hand, and what its Standard Webhooks library accepts."""
from __future__ import annotations

import base64
import hashlib
import hmac
import time

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from workers.webhooks import sign

BODY = b'{"type":"merge.succeeded","data":{"id":"j1"}}'


@pytest.mark.parametrize("secret, key", [
    ("whsec_" + base64.b64encode(b"0123456789abcdef").decode(), b"0123456789abcdef"),  # base64-decoded
    ("plain text secret", b"plain text secret"),                                        # its UTF-8 bytes
])
def test_signature_is_hmac_sha256_over_id_timestamp_body(secret, key):
    ts = int(time.time())
    got = sign(secret, "msg_j1_succeeded", ts, BODY)
    expected = base64.b64encode(hmac.new(key, f"msg_j1_succeeded.{ts}.".encode() + BODY, hashlib.sha256).digest()).decode()
    assert got == f"v1,{expected}"
    headers = {"webhook-id": "msg_j1_succeeded", "webhook-timestamp": str(ts), "webhook-signature": got}
    receiver = Webhook(key)
    assert receiver.verify(BODY, headers) == {"type": "merge.succeeded", "data": {"id": "j1"}}
    with pytest.raises(WebhookVerificationError):
        receiver.verify(BODY + b" ", headers)
