"""submerge's outer layer: HTTP (the REST API: app, routers, schemas, auth, errors, limits, metrics,
logs) and the command line (the top-level ``submerge`` command, service.cli:main). The job system
it drives is ``workers``."""
