"""Breaks the job protocol: goes on when its stdin closes (the daemon is gone)."""

from speaker import Speaker, run

run(Speaker(obeys_eof=False))
