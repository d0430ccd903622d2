"""The job store: tables (``models``), engine, sessions and migrations (``db``, ``migrations/``,
``alembic.ini``), every state change of a job (``store.JobStore``) and the public view of a job
shared by the API and the webhooks (``view``)."""
