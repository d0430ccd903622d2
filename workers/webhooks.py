"""Completion callbacks, signed by the ``standardwebhooks`` package (the Standard Webhooks spec).

Headers: ``webhook-id`` (stable per job and outcome, so receivers can deduplicate retries),
``webhook-timestamp`` (Unix seconds) and ``webhook-signature: v1,<base64 HMAC-SHA256>`` over
``"{webhook-id}.{webhook-timestamp}.{body}"``. The key is ``SUBMERGE_WEBHOOK_SECRET``: a
``whsec_<base64>`` secret is base64-decoded (as Standard Webhooks libraries do), any other
value is used as UTF-8 bytes. Delivery is retried with exponential backoff.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time

import httpx
from standardwebhooks import Webhook

from workers.config import Settings
from workers.jobs.store import JobStore
from workers.jobs.view import job_out
from workers.policy import PolicyError, check_callback

log = logging.getLogger("submerge.webhooks")


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    # The library base64-decodes every str secret; a plain-text secret is documented as its UTF-8 bytes.
    key = secret if secret.startswith("whsec_") else secret.encode()
    return Webhook(key).sign(msg_id, dt.datetime.fromtimestamp(timestamp, dt.timezone.utc), body.decode())


def payload(job) -> bytes:
    data = job_out(job).model_dump(mode="json")
    data.pop("spec", None)
    return json.dumps({"type": f"merge.{job.status}", "timestamp": data["updated_at"], "data": data},
                      separators=(",", ":")).encode()


def deliver(job_id: str, settings: Settings, store: JobStore, sleep=time.sleep) -> bool:
    job = store.get(job_id)
    url = (job.spec or {}).get("callback_url") if job else None
    if not url:
        return False
    body = payload(job)
    msg_id = f"msg_{job.id}_{job.status}"
    last = ""
    for attempt in range(1, settings.webhook_max_attempts + 1):
        try:
            check_callback(url, settings)  # resolve again: the address may have changed since submission
            ts = int(time.time())
            headers = {"content-type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(ts),
                       "user-agent": "submerge-webhooks"}
            if settings.webhook_secret:
                headers["webhook-signature"] = sign(settings.webhook_secret, msg_id, ts, body)
            r = httpx.post(url, content=body, headers=headers, timeout=settings.webhook_timeout, follow_redirects=False)
            if 200 <= r.status_code < 300:
                store.add_event(job_id, "webhook_delivered", {"url": url, "attempt": attempt, "status_code": r.status_code})
                return True
            last = f"HTTP {r.status_code}"
        except PolicyError as e:
            last = e.message
            break
        except Exception as e:  # noqa: BLE001 - network errors: retry
            last = f"{type(e).__name__}: {e}"
        log.warning("webhook for job %s: attempt %d failed: %s", job_id, attempt, last)
        if attempt < settings.webhook_max_attempts:
            sleep(settings.webhook_backoff * 2 ** (attempt - 1))
    store.add_event(job_id, "webhook_failed", {"url": url, "error": last})
    return False


def deliver_async(job_id: str, settings: Settings, store: JobStore) -> threading.Thread | None:
    job = store.get(job_id)
    if not job or not (job.spec or {}).get("callback_url"):
        return None
    t = threading.Thread(target=_safe_deliver, args=(job_id, settings, store), name=f"webhook-{job_id[:8]}", daemon=True)
    t.start()
    return t


def _safe_deliver(job_id: str, settings: Settings, store: JobStore) -> None:
    try:
        deliver(job_id, settings, store)
    except Exception:  # noqa: BLE001
        log.exception("webhook delivery for job %s crashed", job_id)
