"""The web dashboard: served by the daemon on its health/metrics HTTP server.

Pages (each serves the same shell, ``static/index.html``; the ES module ``static/app.js``
draws the view its path names, and moves between views without a reload):

    /                 Overview: the daemon and each agent
    /live             Live calls: the running jobs, refreshed every second
    /jobs/{job_id}    One job: timeline, outcome, metadata, its log followed live
    /history          Ended jobs with filters (?agent= &status= &room= &since=1h|6h|24h|7d|all),
                      failures grouped by error, counts per agent
    /charts           Jobs per agent and load over the last hour; offer -> running latency
    /login            The token form (only when a token is configured)

JSON under ``/api/v1/``: the control API's own handlers (lkrun.api.control.ControlHandlers),
the same data `lkrun status` and `lkrun jobs` read: ``status``, ``jobs``, ``jobs/{id}``,
``jobs/{id}/logs`` (``?follow=1``: streamed), POST ``jobs/{id}/kill`` (``?force=1``), POST
``drain``; and the dashboard's own ``session`` (the CSRF token), ``history`` (rows, failures
grouped, counts per agent) and ``charts`` (the ring of samples, latencies).

Safety (lkrun.dashboard.guard):
- Binds where the health server binds. A configured token (``[daemon] dashboard_token`` or
  env LKRUN_DASHBOARD_TOKEN) is always required. With no token, a loopback bind serves the
  dashboard openly and any other bind serves it disabled: every dashboard path answers 403
  (text/plain, one line saying what to set); /healthz, /readyz and /metrics are unchanged.
- Without a token, a request whose Host header is not a loopback name (localhost,
  127.x.x.x, [::1]) gets 421: DNS rebinding cannot reach a token-less loopback dashboard.
- Without a valid session, a page answers 401 with the login form and an API path 401 JSON.
  The form POSTs the token to /login, which sets an HttpOnly SameSite=Strict cookie named
  for the daemon's port (Secure over https, X-Forwarded-Proto included); scripts may send
  ``Authorization: Bearer TOKEN`` instead. Bytes that are not UTF-8 are a wrong token.
- Actions are POSTs only, with header X-CSRF-Token (from GET /api/v1/session), and the
  same origin: Sec-Fetch-Site (when sent, it decides) "same-origin", else an Origin (when
  sent) naming the Host's host[:port], any scheme (a TLS proxy); else 403.
- Every response (the followed log too): a strict Content-Security-Policy (default-src
  'self', no inline script or style, frame-ancestors 'none'), X-Content-Type-Options
  nosniff, Referrer-Policy same-origin; Cache-Control no-store but on static files.
- /api/v1/jobs lists at most 5,000 jobs (limit=0 too), a log or job at most 10,000 lines.
- The page puts participant-controlled text in the DOM with textContent only.

data-testid attributes (the browser tests' contract; structured values are data-* attributes
beside the visible text):

Every page
    nav-overview, nav-live, nav-history, nav-charts      links
    daemon-name, daemon-version, daemon-uptime, daemon-url
    daemon-phase                  text; data-phase = starting|serving|draining|stopping
    drain-button                  asks for confirmation, then POST drain
    confirm-dialog                the confirmation (a <dialog>); confirm-text inside
    confirm-ok, confirm-cancel
    action-result                 what the last action answered; data-ok = "true"|"false"
    error-banner                  shown when the daemon cannot be reached or says no
    view                          the view's container; data-view = overview|live|job|
                                  history|charts, data-loaded = "true" once it has data

Overview (/)
    agent-row                     one per agent registration; data-agent = its name,
                                  data-state = AVAILABLE|FULL, data-full-reason,
                                  data-jobs, data-max-jobs, data-draining = "true"|"false"
      agent-name, agent-registration (registered | connecting: last error), agent-state,
      agent-full-reason, agent-draining, agent-jobs ("2 / 8"), agent-load, agent-idle,
      agent-entrypoint, agent-framework, agent-python, agent-last-failure

Live calls (/live)
    live-count                    data-count = number of running jobs
    live-empty                    shown when none run
    live-table
      live-row                    data-job-id, data-status
        live-agent, live-room, live-participant, live-age, live-memory, live-cpu,
        live-recovered (data-recovered = "true"|"false"), live-status,
        live-link (an <a> to /jobs/{id})

Job (/jobs/{id})
    job-id, job-agent, job-room, job-participant ("—" for a room job), job-identity (the
    agent's), job-dispatch
    job-status                    data-status = starting|running|stopping|success|failed|lost
    job-timeline
      timeline-offered, timeline-assigned, timeline-running, timeline-ended
                                  each data-time = epoch seconds ("" if not reached)
    job-cause (data-cause), job-stop-reason, job-error, job-exit-code, job-metadata
                                  (an empty field shows "—")
    job-recovery, job-chain
    job-log                       the log; one log-line element per line, appended live
    job-log-state                 data-following = "true" while the log is followed
    kill-button                   graceful stop (after confirmation)
    force-kill-button             kill at once (after confirmation)
    job-not-found

History (/history)
    history-filter-agent (select), history-filter-status (select), history-filter-room
    (input), history-filter-since (select: 1h, 6h, 24h, 7d, all), history-apply
    history-table
      history-row                 data-job-id, data-status, data-cause, data-agent
        history-agent, history-room, history-status, history-cause, history-ended,
        history-error, history-link
    history-empty
    failure-groups
      failure-group               data-count
        failure-error, failure-count, failure-agents
    agent-counts
      agent-count                 data-agent, data-total, data-success, data-failed

Charts (/charts)
    chart-jobs, chart-load, chart-latency     <svg> elements; data-points = samples drawn
    chart-empty                   shown when there are no samples yet

Login (/login)
    login-form, login-token, login-submit, login-error
"""
