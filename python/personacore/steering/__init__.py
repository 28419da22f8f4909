"""The steering layer: interventions (:class:`Steer`, :class:`Ablate`, :class:`Cap`, :class:`When`)
and the :class:`Monitor` bank, as plain values the engine applies (see docs/architecture.md), and
the receipts they leave: reading and verifying audit logs (:mod:`personacore.steering.audit`).
"""

from .audit import (
    AUDIT_FSYNC,
    AuditLogWarning,
    AuditReport,
    model_sha256,
    read_audit_log,
    vector_sha256,
    verify_audit_log,
)
from .interventions import POSITIONS, Ablate, Cap, Steer, When
from .monitor import Monitor

__all__ = [
    "AUDIT_FSYNC",
    "POSITIONS",
    "Ablate",
    "AuditLogWarning",
    "AuditReport",
    "Cap",
    "Monitor",
    "Steer",
    "When",
    "model_sha256",
    "read_audit_log",
    "vector_sha256",
    "verify_audit_log",
]
