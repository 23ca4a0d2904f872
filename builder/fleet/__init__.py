"""The fleet service (`kiln fleet serve`): device enrollment, report ingestion, rollout halts, views.

    store.py    SQLite (default) or PostgreSQL, versioned migrations
    service.py  the Starlette app served by uvicorn over TLS
    pki.py      the service's CA and certificate (`kiln fleet init`)
    views.py    the fleet's state per class, as JSON, text and HTML

docs/fleet.md has the protocol, the trust model and the operations.
"""
