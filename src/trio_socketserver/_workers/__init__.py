# Several processes: `--workers N` and serve_workers(). A supervisor process binds (or
# inherits) the listening sockets once and keeps N worker processes serving them; each
# worker is a fresh interpreter given the sockets by the socket activation protocol and
# reporting to the supervisor by sd_notify, as a service under systemd would. Which file
# runs where:
#   supervisor: _supervisor.py (the supervision), _policy.py (crashes: backoff, crash loop),
#               _process.py (one worker process: start, watch, signal), _command.py (the
#               command line's --workers), _api.py (serve_workers()), _metrics.py (the
#               supervisor's health endpoint, aggregating the workers)
#   worker:     _worker.py (its start: tied to the supervisor, sockets at fd 3 onward),
#               _factory.py (a serve_workers() worker: the program's server factory,
#               which the supervisor names there too),
#               _reporting.py (its statistics, sent to the supervisor)
#   both:       _wire.py (the sd_notify messages between them)
"""Worker processes under a supervisor: ``--workers N`` and :func:`serve_workers`."""
