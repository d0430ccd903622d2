"""submerge service: REST API, job queue worker and the top-level ``submerge`` command (service.cli:main)."""
