"""Jobs that outlive their request: ``POST /v1/jobs`` (and ``Prefer: respond-async`` on every
generation route) keep a request in the job store (service/jobstore), a runner on each replica
claims it and runs it through the route itself, in process, and its answer is kept for
``GET /v1/jobs/{id}``; webhooks tell the caller as it goes."""
