"""Breaks the job protocol: ends its job as a failure when the daemon drains."""

from speaker import Speaker, run

run(Speaker(obeys_drain=False))
