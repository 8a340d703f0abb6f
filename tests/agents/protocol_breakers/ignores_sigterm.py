"""Breaks the job protocol: keeps running after SIGTERM (SIG_IGN)."""

from speaker import Speaker, run

run(Speaker(obeys_sigterm=False))
