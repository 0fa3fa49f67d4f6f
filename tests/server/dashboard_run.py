"""A simulated training run, reported to a `trainguard serve` through its API as a job reports: the
attestation, per-step summaries for three ranks, alerts, a signal, checkpoint signing and verification.

`events(run, key, text)` builds the events; every free-text field carries `text`, so a hostile string
reaches each place a page shows one. Used by the dashboard tests and by docs/make_dashboard_shots.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

from trainguard.ledger import SigningKey, new_event
from trainguard.supervisor._attest import sign_attestation

RANKS = 3
STEPS = 40
SUMMARY_EVERY = 10
SLOW_RANK = 2
SLOW_FROM = 25
FINGERPRINT_STEP = 30
COLUMNS = [
    "step",
    "loss",
    "grad_norm",
    "optimizer_off_cpu_ms",
    "forward_off_cpu_ms",
    "data_off_cpu_ms",
    "data_order_digest",
    "hyperparameter_changes",
]


def _row(step: int) -> list[Any]:
    loss = round(2.5 * math.exp(-step / 18) + 0.05 * math.sin(step), 4)
    optimizer = [round(4.0 + 0.3 * r + 0.1 * (step % 3), 1) for r in range(RANKS)]
    if step >= SLOW_FROM:
        optimizer[SLOW_RANK] += 40.0  # the planted sleep in one rank's optimizer
    return [
        step,
        loss,
        round(1.0 / (1 + step), 4),
        optimizer,
        [round(20.0 + r, 1) for r in range(RANKS)],
        [round(2.0 + 0.5 * r, 1) for r in range(RANKS)],
        [f"{step * 7919 + r:016x}" for r in range(RANKS)],
        [],
    ]


def events(run: str, key: SigningKey, text: str = "") -> list[tuple[str, dict[str, Any]]]:
    """(type, payload) of the whole run, in the order a job sends them; `text` goes in every text field."""
    attestation = {
        "run_id": run,
        "command": ["torchrun", "--nproc-per-node", str(RANKS), f"train.py{text}"],
        "code": {"revision": "0" * 40, "diff_sha256": None, "root": f"/work/model{text}"},
        "environment": {"digest": "sha256:" + "ab" * 32, "note": text},
        "config": {"path": f"/work/config{text}.yaml", "sha256": "cd" * 32},
        "seeds": {"torch": 1234},
        "world_size": RANKS,
        "hosts": [f"node-1{text}"],
        "user": f"alice{text}",
        "uid": 1000,
        "inputs": [],
    }
    out: list[tuple[str, dict[str, Any]]] = [
        ("run.attest", sign_attestation(attestation, key)),
        ("run.start", {"pid": 4242, "command": attestation["command"], "heartbeat": f"/tmp/hb{text}"}),
        (
            "monitor.start",
            {
                "world_size": RANKS,
                "checks": ["fingerprint", "step_time", "update"],
                "optimizer": f"AdamW{text}",
                "notices": [text],
            },
        ),
    ]
    for first in range(1, STEPS + 1, SUMMARY_EVERY):
        rows = [_row(step) for step in range(first, min(first + SUMMARY_EVERY, STEPS + 1))]
        out.append(("monitor.steps", {"columns": COLUMNS, "rows": rows}))
        if first <= SLOW_FROM < first + SUMMARY_EVERY:
            out.append(
                (
                    "monitor.alert",
                    {
                        "check": "step_time",
                        "ranks": [SLOW_RANK],
                        "step": SLOW_FROM,
                        "message": f"rank {SLOW_RANK}'s optimizer step is 10x slower than its peers{text}",
                        "action": "warn",
                    },
                )
            )
        if first <= FINGERPRINT_STEP < first + SUMMARY_EVERY:
            out.append(
                (
                    "monitor.alert",
                    {
                        "check": "fingerprint",
                        "ranks": [SLOW_RANK],
                        "step": FINGERPRINT_STEP,
                        "message": f"replica fingerprints disagree at step {FINGERPRINT_STEP}{text}",
                        "action": "stop",
                    },
                )
            )
    out += [
        (
            "monitor.signal",
            {
                "rank": 1,
                "step": 31,
                "signal": 15,
                "name": f"SIGTERM{text}",
                "sender_pid": 999,
                "sender_cmdline": text,
            },
        ),
        (
            "provenance.sign",
            {
                "path": f"/ckpt/step-30{text}",
                "root": "sha256:" + "12" * 32,
                "kind": "directory",
                "files": 3,
                "bytes": 123456,
                "key_id": "sha256:" + "34" * 32,
                "ok": True,
                "problems": [],
                "signature": f"/ckpt/step-30{text}.sig",
                "format": "trainguard",
            },
        ),
        (
            "provenance.verify",
            {
                "path": f"/ckpt/step-30{text}",
                "root": "sha256:" + "56" * 32,
                "kind": "directory",
                "files": 3,
                "bytes": 123456,
                "key_id": "sha256:" + "34" * 32,
                "ok": False,
                "problems": [f"model.safetensors: digest differs{text}"],
                "signature": f"/ckpt/step-30{text}.sig",
                "format": "trainguard",
            },
        ),
        ("run.end", {"exit_code": 1, "cause": f"stopped by the guard{text}"}),
    ]
    return out


def batch(run: str, key: SigningKey, text: str = "", prefix: str = "sim") -> bytes:
    """The POST body that delivers the whole run, one idempotency key per event."""
    items = [
        {"key": f"{prefix}/{i}", "event": json.loads(new_event(kind, payload, run_id=run).canonical())}
        for i, (kind, payload) in enumerate(events(run, key, text))
    ]
    return json.dumps({"events": items}).encode("utf-8")
